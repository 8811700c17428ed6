//! The message body on the wire: DATA's dot-stuffing and line endings.
//!
//! Inbound, smtp-proto's `DataReceiver` undoes the stuffing (see the session); outbound,
//! [`BodyEncoder`] redoes it, chunk by chunk, so a body is never held whole.

/// Turns a message body into DATA wire form. CR and LF that are not a CRLF pair become CRLF: RFC 5321
/// §2.3.8 allows an SMTP client to send them only as CRLF, and passing a bare LF on would let a mailer
/// smuggle an end of data (`LF.LF`) past the relay to an upstream that accepts one. Lines starting with
/// "." are dot-stuffed. State carries across chunks, which may split anywhere.
#[derive(Debug, Default)]
pub struct BodyEncoder {
    pending_cr: bool,
    mid_line: bool,
}

impl BodyEncoder {
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < chunk.len() {
            if self.mid_line && !self.pending_cr {
                // Fast path: copy up to the next line-end character.
                let run = memchr::memchr2(b'\r', b'\n', &chunk[i..]).unwrap_or(chunk.len() - i);
                out.extend_from_slice(&chunk[i..i + run]);
                i += run;
                if i == chunk.len() {
                    break;
                }
            }
            let b = chunk[i];
            i += 1;
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.mid_line = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.mid_line = false;
                }
                b'.' if !self.mid_line => {
                    out.extend_from_slice(b"..");
                    self.mid_line = true;
                }
                _ => {
                    out.push(b);
                    self.mid_line = true;
                }
            }
        }
    }

    /// The end-of-data sequence, completing an unfinished last line; resets for the next message.
    pub fn finish(&mut self) -> &'static [u8] {
        let unfinished = self.pending_cr || self.mid_line;
        *self = BodyEncoder::default();
        if unfinished {
            b"\r\n.\r\n"
        } else {
            b".\r\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(chunks: &[&[u8]]) -> Vec<u8> {
        let mut enc = BodyEncoder::default();
        let mut out = Vec::new();
        for c in chunks {
            enc.encode(c, &mut out);
        }
        out.extend_from_slice(enc.finish());
        out
    }

    #[test]
    fn stuffing_is_exact_across_chunk_boundaries() {
        assert_eq!(
            encoded(&[b".a\r\n.", b"b\r\nc.\r\n"]),
            b"..a\r\n..b\r\nc.\r\n.\r\n"
        );
        assert_eq!(encoded(&[b"x\r", b"\n", b".y\r\n"]), b"x\r\n..y\r\n.\r\n");
        assert_eq!(encoded(&[]), b".\r\n");
        assert_eq!(encoded(&[b"no newline"]), b"no newline\r\n.\r\n");
        assert_eq!(encoded(&[b"blank\r\n\r\n"]), b"blank\r\n\r\n.\r\n");
    }

    #[test]
    fn bare_line_ends_become_crlf_so_no_end_of_data_can_be_smuggled() {
        let smuggle = b"one\n.\nMAIL FROM:<x@evil>\r\nlone\r.\r\n";
        let wire = encoded(&[smuggle]);
        assert_eq!(
            wire,
            b"one\r\n..\r\nMAIL FROM:<x@evil>\r\nlone\r\n..\r\n.\r\n"
        );
        // Byte by byte gives the same.
        let parts: Vec<&[u8]> = smuggle.chunks(1).collect();
        assert_eq!(encoded(&parts), wire);
        assert_eq!(encoded(&[b"end\r"]), b"end\r\n.\r\n");
    }
}
