//! AUTH PLAIN and LOGIN (RFC 4954, 4616): the exchange, never the password kept longer than the
//! exchange needs it (its buffers are zeroized).

use base64::Engine;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};

use super::Action;
use super::{AuthOutcome, Phase, Session, Waiting, LOCKED_OUT, MAX_AUTH_FAILURES};
use crate::util::secret::Secret;

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

impl Session {
    pub(super) fn auth(&mut self, mechanism: u64, initial: String) {
        let initial = zeroize::Zeroizing::new(initial);
        if self.auth.is_some() {
            return self.reply(503, "5.5.1 Already authenticated");
        }
        if !self.ehlo_done {
            return self.reply(503, "5.5.1 Send EHLO first");
        }
        if self.in_transaction {
            return self.reply(503, "5.5.1 AUTH not allowed during a mail transaction");
        }
        if !self.auth_allowed() {
            let way = match (
                self.config.starttls_available,
                self.config.implicit_tls_port,
            ) {
                (true, Some(port)) => format!("; use STARTTLS or port {port}"),
                (true, None) => "; use STARTTLS".to_string(),
                (false, Some(port)) => format!("; use port {port} (TLS)"),
                (false, None) => String::new(),
            };
            return self.reply(
                538,
                format!("5.7.11 Encryption required for requested authentication mechanism{way}"),
            );
        }
        match mechanism {
            AUTH_PLAIN if initial.is_empty() => {
                self.reply(334, "");
                self.phase = Phase::AuthPlain;
            }
            AUTH_PLAIN => self.auth_plain_response(initial.as_bytes()),
            AUTH_LOGIN if initial.is_empty() => {
                self.reply(334, "VXNlcm5hbWU6");
                self.phase = Phase::AuthLoginUser;
            }
            AUTH_LOGIN => self.auth_login_user(initial.as_bytes()),
            _ => self.reply(
                504,
                "5.5.4 Unrecognized authentication type; use PLAIN or LOGIN",
            ),
        }
    }

    /// Decodes a SASL response line; `None` after replying when it was `*` or not base64.
    pub(super) fn sasl_decode(&mut self, line: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        if line == b"*" {
            self.reply(501, "5.0.0 Authentication cancelled");
            return None;
        }
        if line == b"=" {
            return Some(Vec::new().into());
        }
        match b64().decode(line) {
            Ok(v) => Some(v.into()),
            Err(_) => {
                self.reply(501, "5.5.2 Invalid base64 data");
                None
            }
        }
    }

    pub(super) fn auth_plain_response(&mut self, line: &[u8]) {
        let Some(decoded) = self.sasl_decode(line) else {
            return;
        };
        let mut parts = decoded.split(|b| *b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.reply(501, "5.5.2 Malformed AUTH PLAIN response");
        };
        if !authzid.is_empty() && authzid != authcid {
            return self.reply(
                535,
                "5.7.8 Authorization identity must be empty or equal to the login",
            );
        }
        let (Ok(login), Ok(password)) =
            (std::str::from_utf8(authcid), std::str::from_utf8(password))
        else {
            return self.reply(501, "5.5.2 Login and password must be UTF-8");
        };
        self.authenticate(login.to_string(), Secret::new(password));
    }

    pub(super) fn auth_login_user(&mut self, line: &[u8]) {
        let Some(decoded) = self.sasl_decode(line) else {
            return;
        };
        match String::from_utf8(decoded.to_vec()) {
            Ok(login) => {
                self.reply(334, "UGFzc3dvcmQ6");
                self.phase = Phase::AuthLoginPass { login };
            }
            Err(_) => self.reply(501, "5.5.2 Login must be UTF-8"),
        }
    }

    pub(super) fn auth_login_pass(&mut self, login: String, line: &[u8]) {
        let Some(decoded) = self.sasl_decode(line) else {
            return;
        };
        match std::str::from_utf8(&decoded) {
            Ok(password) => self.authenticate(login, Secret::new(password)),
            Err(_) => self.reply(501, "5.5.2 Password must be UTF-8"),
        }
    }

    pub(super) fn authenticate(&mut self, login: String, password: Secret) {
        self.wait(Action::Authenticate { login, password }, Waiting::Auth);
    }

    pub fn auth_result(&mut self, outcome: AuthOutcome) {
        if !self.expect_waiting(Waiting::Auth) {
            return;
        }
        match outcome {
            AuthOutcome::Ok(authorized) => {
                self.auth = Some(authorized);
                self.reply(235, "2.7.0 Authentication successful");
            }
            AuthOutcome::BadCredentials => {
                self.auth_failures += 1;
                self.reply(535, "5.7.8 Authentication credentials invalid");
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    self.reply(
                        421,
                        "4.7.0 Too many failed authentication attempts, closing connection",
                    );
                    self.out.push_back(Action::Close);
                    self.phase = Phase::Closed;
                }
            }
            AuthOutcome::GrantUnavailable(why) => self.reply(454, format!("4.7.0 {why}")),
            AuthOutcome::LockedOut => {
                self.reply(421, LOCKED_OUT);
                self.out.push_back(Action::Close);
                self.phase = Phase::Closed;
            }
        }
    }
}
