//! The end of a DATA body, exactly as RFC 5321 §4.1.1.4 has it, and dot-unstuffing.
//!
//! Only the five octets `CR LF . CR LF` end a message (the `CR LF` before the dot may be the one
//! that ended the DATA command line). This replaces smtp-proto's `DataReceiver`, which also ended a
//! message at `CR LF . CR CR LF` (it stays in its "saw CRLF ." state while it reads CRs): one DATA
//! could then carry a second, smuggled transaction. Every other sequence is data (`\r\n.\r\r\n`,
//! `\r\n.\n`, `\n.\n`, ...); the outbound [`super::body::BodyEncoder`] turns its bare CR and LF
//! into CRLF, so that it cannot end the message at the upstream either, or the session refuses the
//! message (`[limits] bare_line_endings = "reject"`).
//!
//! A dot at a line start (after a CRLF) is stuffing and is removed; a line is what a CRLF ends, so
//! a dot after a bare LF is data.

/// Where the decoder is in a possible end of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dot {
    /// Not at a dot.
    No,
    /// A dot at a line start (removed: stuffing, or the start of the end).
    Seen,
    /// A dot at a line start and a CR: the end if LF comes next.
    ThenCr,
}

/// Decodes a DATA body from its wire form; state carries across reads, which may split anywhere.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    /// The last two octets of wire form taken (`CR LF` at first: the DATA command's line end).
    last: [u8; 2],
    dot: Dot,
    /// A CR not followed by LF, or an LF not preceded by CR, has been seen.
    bare: bool,
}

impl Default for DataDecoder {
    fn default() -> Self {
        DataDecoder::new()
    }
}

impl DataDecoder {
    pub fn new() -> DataDecoder {
        DataDecoder {
            last: *b"\r\n",
            dot: Dot::No,
            bare: false,
        }
    }

    /// Right after a CRLF, with nothing held: whole CRLF lines that start with no dot decode to
    /// themselves from here, and leave the decoder as it is.
    pub fn at_line_start(&self) -> bool {
        self.dot == Dot::No && self.last == *b"\r\n"
    }

    /// Whether the body so far has a CR or LF that is not part of a CRLF pair.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.bare
    }

    /// Decodes from `input` into `out` up to the end of data; returns the octets taken and whether
    /// the end of data was among them (the octets after it are the next command's).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.dot {
                Dot::Seen => {
                    let b = input[i];
                    i += 1;
                    if b == b'\r' {
                        self.dot = Dot::ThenCr;
                        continue;
                    }
                    // The dot was stuffing; `b` is the line's first octet.
                    self.dot = Dot::No;
                    self.last = *b"\n.";
                    self.push(b, out);
                }
                Dot::ThenCr => {
                    let b = input[i];
                    i += 1;
                    self.dot = Dot::No;
                    if b == b'\n' {
                        self.last = *b"\r\n";
                        return (i, true);
                    }
                    // `.CR` then anything but LF: the dot was stuffing, the CR is data.
                    self.last = *b"\n.";
                    self.push(b'\r', out);
                    self.push(b, out);
                }
                Dot::No if self.last == *b"\r\n" && input[i] == b'.' => {
                    self.dot = Dot::Seen;
                    i += 1;
                }
                Dot::No => {
                    let rest = &input[i..];
                    let run = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                    if run == 0 {
                        self.push(rest[0], out);
                        i += 1;
                        continue;
                    }
                    // Octets that are neither CR nor LF: after a CR, that CR was bare.
                    self.bare |= self.last[1] == b'\r';
                    out.extend_from_slice(&rest[..run]);
                    self.last = match run {
                        1 => [self.last[1], rest[0]],
                        _ => [rest[run - 2], rest[run - 1]],
                    };
                    i += run;
                }
            }
        }
        (i, false)
    }

    /// One octet of data (not a line-start dot).
    fn push(&mut self, b: u8, out: &mut Vec<u8>) {
        let after_cr = self.last[1] == b'\r';
        self.bare |= (after_cr && b != b'\n') || (b == b'\n' && !after_cr);
        out.push(b);
        self.last = [self.last[1], b];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 5321 §4.1.1.4 written as plainly as possible, as the oracle for the decoder and the
    /// session: the stream (behind the DATA command's CRLF) ends at the first exact `CRLF.CRLF`; in
    /// what comes before, a dot at a line start (after a CRLF) is removed. Returns the body, whether
    /// the end was found, and how many octets of `wire` the message took.
    pub(crate) fn reference(wire: &[u8]) -> (Vec<u8>, bool, usize) {
        let mut stream = b"\r\n".to_vec();
        stream.extend_from_slice(wire);
        let end = stream.windows(5).position(|w| w == b"\r\n.\r\n");
        let (content, found, taken) = match end {
            // The CRLF before the dot belongs to the body.
            Some(at) => (&stream[2..at + 2], true, at + 3),
            None => (&stream[2..], false, wire.len()),
        };
        let mut body = Vec::with_capacity(content.len());
        for (i, &b) in content.iter().enumerate() {
            let line_start = i == 0 || (i >= 2 && &content[i - 2..i] == b"\r\n");
            if !(line_start && b == b'.') {
                body.push(b);
            }
        }
        (body, found, taken)
    }

    /// Whether a body (its wire form up to the end) has a CR or LF outside a CRLF pair.
    pub(crate) fn has_bare_line_ending(wire: &[u8]) -> bool {
        wire.iter().enumerate().any(|(i, &b)| {
            (b == b'\r' && wire.get(i + 1) != Some(&b'\n'))
                || (b == b'\n' && (i == 0 || wire[i - 1] != b'\r'))
        })
    }

    fn decode_in(parts: &[&[u8]]) -> (Vec<u8>, bool, usize, bool) {
        let mut d = DataDecoder::new();
        let (mut out, mut taken) = (Vec::new(), 0);
        for part in parts {
            let (n, done) = d.decode(part, &mut out);
            taken += n;
            if done {
                return (out, true, taken, d.saw_bare_line_ending());
            }
        }
        (out, false, taken, d.saw_bare_line_ending())
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_message() {
        // The smuggling sequences of CVE-2023-51766 and kin are data.
        for tail in [
            &b"\r\n.\r\r\n"[..],
            b"\r\n.\n",
            b"\n.\r\n",
            b"\n.\n",
            b"\r.\r",
            b"\r\n.\rX",
            b"\r\n.\r\r\r\n",
        ] {
            let mut wire = b"hello".to_vec();
            wire.extend_from_slice(tail);
            wire.extend_from_slice(b"MAIL FROM:<d@example.com>\r\n");
            let (_, done, _, bare) = decode_in(&[&wire]);
            assert!(!done, "{tail:?} ended the message");
            assert!(bare, "{tail:?} has a bare line ending");
        }
        let (body, done, taken, bare) = decode_in(&[b"a\r\n..b\r\n.\r\nQUIT\r\n"]);
        assert_eq!(
            (body.as_slice(), done, taken, bare),
            (&b"a\r\n.b\r\n"[..], true, 11, false)
        );
        // The CRLF that ended DATA counts: an empty body.
        assert_eq!(decode_in(&[b".\r\n"]), (Vec::new(), true, 3, false));
    }

    pub(crate) fn wire_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        // Plain octets and the sequences that matter, including the smuggling variants.
        let piece = prop_oneof![
            6 => Just(b"a".to_vec()),
            3 => Just(b"\r\n".to_vec()),
            2 => Just(b"\r".to_vec()),
            2 => Just(b"\n".to_vec()),
            2 => Just(b".".to_vec()),
            1 => Just(b"\r\n.\r\r\n".to_vec()),
            1 => Just(b"\r\n.\n".to_vec()),
            1 => Just(b"\n.\r\n".to_vec()),
            1 => Just(b"\n.\n".to_vec()),
            1 => Just(b"\r.\r".to_vec()),
            1 => Just(b"\r\n.\r".to_vec()),
            1 => Just(b"\r\n..\r\n".to_vec()),
            1 => Just(b"\r\n.\r\n".to_vec()),
            1 => any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(piece, 0..120).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn the_decoder_agrees_with_rfc_5321_however_the_reads_split(
            wire in wire_strategy(),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut from = 0;
            for c in cuts {
                parts.push(&wire[from..c]);
                from = c;
            }
            parts.push(&wire[from..]);
            let (body, done, taken, bare) = decode_in(&parts);
            let (want, found, want_taken) = reference(&wire);
            if found {
                proptest::prop_assert_eq!(&body, &want);
            } else {
                // Without an end, a CR after a line-start dot waits for the next octet.
                proptest::prop_assert!(want.starts_with(&body) && want.len() - body.len() <= 1);
            }
            proptest::prop_assert_eq!(done, found);
            proptest::prop_assert_eq!(taken, want_taken);
            // The body's wire form: up to the end of data without its ".CRLF"; without an end, all
            // but a last CR, whose fate the next octet decides.
            let message = match found {
                true => &wire[..want_taken - 3],
                false => wire.strip_suffix(b"\r").unwrap_or(&wire),
            };
            proptest::prop_assert_eq!(bare, has_bare_line_ending(message));
        }
    }
}
