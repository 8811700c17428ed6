//! The `xoauth-relay` binary; everything it does is in the library (`cli` first).

fn main() -> std::process::ExitCode {
    xoauth_relay::cli::main()
}
