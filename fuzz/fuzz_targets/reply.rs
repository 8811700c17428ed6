//! The upstream reply parser fed arbitrary bytes: it must not panic, and what it parses must say
//! how much it consumed and write back as well-formed lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xoauth_relay::smtp::Reply;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((reply, used))) = Reply::parse(data) {
        assert!(used <= data.len());
        let _ = reply.severity();
        let _ = reply.enhanced();
        let wire = reply.to_bytes();
        assert!(wire.ends_with(b"\r\n"));
    }
});
