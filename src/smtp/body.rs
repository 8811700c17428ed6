//! The message body on the wire: DATA's dot-stuffing and line endings.
//!
//! Inbound, [`super::data::DataDecoder`] undoes the stuffing (see the session); outbound,
//! [`BodyEncoder`] redoes it, chunk by chunk, so a body is never held whole. Most mail is already
//! in wire form both ways (CRLF lines, none starting with "."): the session hands such lines on as a
//! [`BodyChunk`] that shares the read buffer, and the encoder passes them through untouched, so a
//! relayed body is checked once and copied only into the TLS record.

use bytes::Bytes;

/// Part of a message body, dot-stuffing undone.
#[derive(Debug)]
pub struct BodyChunk {
    bytes: Bytes,
    /// Whole lines, starting at a line start, that DATA carries unchanged: the wire form and the
    /// body are the same bytes.
    wire_form: bool,
}

impl BodyChunk {
    /// Body bytes as they came out of a decoder.
    pub fn decoded(bytes: impl Into<Bytes>) -> BodyChunk {
        BodyChunk {
            bytes: bytes.into(),
            wire_form: false,
        }
    }

    /// Lines that [`verbatim_lines`] found to be in wire form (and so their own decoding), starting
    /// at a line start.
    pub(crate) fn wire_lines(bytes: Bytes) -> BodyChunk {
        debug_assert_eq!(verbatim_lines(&bytes, false), bytes.len());
        BodyChunk {
            bytes,
            wire_form: true,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Turns a message body into DATA wire form. CR and LF that are not a CRLF pair become CRLF: RFC 5321
/// §2.3.8 allows an SMTP client to send them only as CRLF, and passing a bare LF on would let a mailer
/// smuggle an end of data (`LF.LF`) past the relay to an upstream that accepts one. Lines starting with
/// "." are dot-stuffed. State carries across chunks, which may split anywhere.
#[derive(Debug, Default)]
pub struct BodyEncoder {
    pending_cr: bool,
    mid_line: bool,
    /// Line endings only, no dot-stuffing: the message as a file (an HTTP API's body).
    unstuffed: bool,
}

impl BodyEncoder {
    /// An encoder that makes bare CR and LF into CRLF but leaves leading dots alone: the message
    /// itself rather than its DATA wire form (what an HTTP API takes). No end-of-data sequence
    /// either: [`BodyEncoder::finish_unstuffed`] completes a pending CR only.
    pub fn unstuffed() -> BodyEncoder {
        BodyEncoder {
            unstuffed: true,
            ..BodyEncoder::default()
        }
    }

    /// The end of an unstuffed message: a CR left pending becomes CRLF.
    pub fn finish_unstuffed(&mut self) -> &'static [u8] {
        let pending = std::mem::take(&mut self.pending_cr);
        self.mid_line = false;
        if pending {
            b"\r\n"
        } else {
            b""
        }
    }

    /// How many leading bytes of `chunk` are already in wire form (whole well-formed lines); the
    /// encoder counts them as sent.
    fn verbatim(&mut self, chunk: &[u8]) -> usize {
        if self.pending_cr {
            return 0;
        }
        let n = verbatim_lines(chunk, self.mid_line);
        if n > 0 {
            self.mid_line = false;
        }
        n
    }

    /// The chunk's bytes when they go out exactly as they are (wire-form lines, and the encoder at a
    /// line start), counted as sent; `None` when they need [`BodyEncoder::encode`].
    pub fn as_is<'a>(&mut self, chunk: &'a BodyChunk) -> Option<&'a [u8]> {
        (chunk.wire_form && !self.pending_cr && !self.mid_line).then_some(chunk.bytes())
    }

    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < chunk.len() {
            // Most mail is already well-formed: whole lines of it go out as they are, in one copy.
            let n = self.verbatim(&chunk[i..]);
            out.extend_from_slice(&chunk[i..i + n]);
            i += n;
            if n == 0 {
                i += self.encode_line(&chunk[i..], out);
            }
        }
    }

    /// Encodes up to and including the first line end of `chunk` (or all of it); returns the bytes
    /// consumed.
    fn encode_line(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < chunk.len() {
            if self.mid_line && !self.pending_cr {
                // Copy up to the next line-end character.
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
                return if b == b'\n' { i } else { i - 1 };
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.mid_line = false;
                    return i;
                }
                b'.' if !self.mid_line && !self.unstuffed => {
                    out.extend_from_slice(b"..");
                    self.mid_line = true;
                }
                _ => {
                    out.push(b);
                    self.mid_line = true;
                }
            }
        }
        i
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

/// The length of the longest prefix of `s`, ending with CRLF, that [`BodyEncoder`] would send
/// unchanged (no bare CR or LF, no line starting with "."), given whether `s` starts mid-line.
/// Byte pairs are checked in fixed blocks with no early exit inside one, which the compiler turns
/// into vector code: this is the per-byte cost of relaying a body.
pub(crate) fn verbatim_lines(s: &[u8], mid_line: bool) -> usize {
    const BLOCK: usize = 256;
    match s.first() {
        None | Some(b'\n') => return 0,
        Some(b'.') if !mid_line => return 0,
        _ => {}
    }
    // A pair (a, b) is wrong when a CR is not followed by LF, an LF not preceded by CR, or an LF
    // followed by ".": `clean` ends before the first such pair's second byte.
    let bad = |a: u8, b: u8| ((a == b'\r') != (b == b'\n')) | ((a == b'\n') & (b == b'.'));
    let pairs = s.len() - 1;
    let mut clean = s.len();
    let mut at = 0;
    while at < pairs {
        let end = (at + BLOCK).min(pairs);
        let (a, b) = (&s[at..end], &s[at + 1..end + 1]);
        let any = a.iter().zip(b).fold(false, |acc, (&x, &y)| acc | bad(x, y));
        if any {
            let first = a.iter().zip(b).position(|(&x, &y)| bad(x, y)).unwrap_or(0);
            clean = at + first + 1;
            break;
        }
        at = end;
    }
    memchr::memrchr(b'\n', &s[..clean]).map_or(0, |lf| lf + 1)
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

    /// The rule, one byte at a time: what every chunking of any input must produce.
    fn reference(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut pending_cr, mut mid_line) = (false, false);
        for &b in body {
            if pending_cr {
                pending_cr = false;
                out.extend_from_slice(b"\r\n");
                mid_line = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    mid_line = false;
                }
                b'.' if !mid_line => {
                    out.extend_from_slice(b"..");
                    mid_line = true;
                }
                _ => {
                    out.push(b);
                    mid_line = true;
                }
            }
        }
        out.extend_from_slice(if pending_cr || mid_line {
            b"\r\n.\r\n"
        } else {
            b".\r\n"
        });
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn any_body_split_anywhere_encodes_as_the_rule_says(
            // Mostly well-formed lines, with the characters that matter mixed in.
            body in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => proptest::prelude::Just(b'a'),
                    2 => proptest::prelude::Just(b'\r'),
                    2 => proptest::prelude::Just(b'\n'),
                    1 => proptest::prelude::Just(b'.'),
                    1 => proptest::prelude::any::<u8>(),
                ],
                0..400,
            ),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut from = 0;
            for c in cuts {
                parts.push(&body[from..c]);
                from = c;
            }
            parts.push(&body[from..]);
            proptest::prop_assert_eq!(encoded(&parts), reference(&body));
        }
    }

    #[test]
    fn well_formed_lines_go_out_in_one_piece() {
        let body = b"Subject: x\r\n\r\nline one\r\nline two\r\n".repeat(100);
        assert_eq!(verbatim_lines(&body, false), body.len());
        assert_eq!(verbatim_lines(b"ab\r\n.cd\r\n", false), 4);
        assert_eq!(verbatim_lines(b"ab\r\ncd\nx", false), 4);
        assert_eq!(verbatim_lines(b"ab\rcd\r\n", false), 0);
        assert_eq!(verbatim_lines(b".ab\r\n", true), 5);
        assert_eq!(verbatim_lines(b".ab\r\n", false), 0);
    }
}
