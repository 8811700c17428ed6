//! SMTP replies: the frames both sides of the relay speak.
//!
//! One type serves the mailer-facing session and the upstream client, so an upstream rejection can be
//! handed to the mailer unchanged (its code, enhanced code and text). [`Reply::severity`] and
//! [`Reply::enhanced`] are what retry-or-bounce decisions and hints read; nothing classifies a reply
//! by its display text.
//!
//! The framing is parsed here rather than with smtp-proto's `ResponseReceiver`, which keeps the parts
//! of an enhanced status code as `u8`: Microsoft's throttling codes (`4.7.500`–`4.7.699`) would come
//! out as `4.7.255`, and the mailer must see the upstream's code as sent.

use std::fmt;

/// What the reply code's first digit says (RFC 5321 §4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// 2xx
    Positive,
    /// 3xx: go on (354 after DATA, 334 in SASL).
    Intermediate,
    /// 4xx: try again later.
    Transient,
    /// 5xx: do not repeat as it is.
    Permanent,
}

/// An RFC 3463 enhanced status code, `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u16, pub u16, pub u16);

impl EnhancedCode {
    /// Parses `5.7.139` (the whole word).
    pub fn parse(word: &str) -> Option<EnhancedCode> {
        let mut parts = word.split('.');
        let mut next = |max_len: usize| {
            parts
                .next()
                .filter(|p| {
                    !p.is_empty() && p.len() <= max_len && p.bytes().all(|b| b.is_ascii_digit())
                })
                .and_then(|p| p.parse::<u16>().ok())
        };
        let code = EnhancedCode(next(1)?, next(3)?, next(3)?);
        (parts.next().is_none() && matches!(code.0, 2 | 4 | 5)).then_some(code)
    }
}

impl std::fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, without the code; the enhanced status code, when present, leads the text.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, lines: Vec<String>) -> Reply {
        Reply { code, lines }
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        matches!(self.severity(), Severity::Positive | Severity::Intermediate)
    }

    pub fn severity(&self) -> Severity {
        match self.code {
            200..=299 => Severity::Positive,
            300..=399 => Severity::Intermediate,
            400..=499 => Severity::Transient,
            _ => Severity::Permanent,
        }
    }

    /// The enhanced status code leading the first line, if any.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        let first = self.lines.first()?.split_whitespace().next()?;
        EnhancedCode::parse(first)
    }

    /// Whether `code` appears as a whole word in any line: Microsoft puts its specific code
    /// (`5.7.139`) after a generic one on some lines.
    pub fn mentions(&self, code: EnhancedCode) -> bool {
        self.lines
            .iter()
            .flat_map(|l| l.split(|c: char| !(c.is_ascii_digit() || c == '.')))
            .any(|word| EnhancedCode::parse(word) == Some(code))
    }

    /// Wire form: `250-first\r\n250 last\r\n`. Bare CR/LF in the text cannot split a reply.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        if self.lines.is_empty() {
            out.extend_from_slice(format!("{} \r\n", self.code).as_bytes());
        }
        let pieces: Vec<String> = self.lines.iter().flat_map(|l| wrap(l)).collect();
        let last = pieces.len().saturating_sub(1);
        for (i, piece) in pieces.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, piece).as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// Parses one complete reply from `buf`; returns it and the bytes consumed, or `None` if more input
    /// is needed. `Err` for a line that is not `DDD[ -]text`.
    pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
        let mut pos = 0;
        let mut lines = Vec::new();
        loop {
            let Some(nl) = buf[pos..].iter().position(|b| *b == b'\n') else {
                return Ok(None);
            };
            let raw = &buf[pos..pos + nl];
            pos += nl + 1;
            let line = String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw));
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (200..600).contains(c))
                .ok_or_else(|| format!("malformed reply line: {:.80}", line))?;
            let sep = line.as_bytes().get(3).copied().unwrap_or(b' ');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if sep != b'-' {
                return Ok(Some((Reply { code, lines }, pos)));
            }
        }
    }

    /// First line, for logs: `550 5.1.1 No such user`.
    pub fn summary(&self) -> String {
        format!(
            "{} {}",
            self.code,
            self.lines.first().map(String::as_str).unwrap_or("")
        )
    }
}

/// Longest reply text per line: RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets.
const MAX_TEXT: usize = 400;

/// Splits `text` into pieces that fit a reply line (at spaces where possible); CR and LF, which
/// would end the reply early, are dropped.
fn wrap(text: &str) -> Vec<String> {
    let clean: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let mut pieces = Vec::new();
    let mut rest = clean.as_str();
    while rest.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let cut = rest[..cut]
            .rfind(' ')
            .filter(|&i| i > MAX_TEXT / 2)
            .unwrap_or(cut);
        pieces.push(rest[..cut].trim_end().to_string());
        rest = rest[cut..].trim_start();
    }
    pieces.push(rest.to_string());
    pieces
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join(" / "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_round_trip() {
        let r = Reply::multi(
            250,
            vec!["relay.local".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        let wire = r.to_bytes();
        assert_eq!(
            wire,
            b"250-relay.local\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
        let (back, used) = Reply::parse(&wire).unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(used, wire.len());
        assert!(Reply::parse(b"250-partial\r\n").unwrap().is_none());
        assert!(Reply::parse(b"hello\r\n").is_err());
        let long = Reply::new(454, format!("4.7.0 {}", "word ".repeat(300))).to_bytes();
        assert!(long.split(|b| *b == b'\n').all(|l| l.len() <= 512));
        let (back, _) = Reply::parse(&long).unwrap().unwrap();
        assert!(back.lines.len() > 1 && back.code == 454);
    }

    #[test]
    fn severity_and_enhanced_codes() {
        let r = Reply::new(
            451,
            "4.7.650 The mail server has been temporarily rate limited",
        );
        assert_eq!(r.severity(), Severity::Transient);
        assert_eq!(r.enhanced(), Some(EnhancedCode(4, 7, 650)));
        assert_eq!(Reply::new(250, "OK").enhanced(), None);
        assert_eq!(Reply::new(550, "x").severity(), Severity::Permanent);
        assert!(Reply::new(354, "go").is_positive());
        let ms = Reply::new(535, "5.7.3 Authentication unsuccessful [5.7.139 detail]");
        assert!(ms.mentions(EnhancedCode(5, 7, 139)));
        assert!(!ms.mentions(EnhancedCode(5, 7, 13)));
        assert_eq!(EnhancedCode::parse("5.7"), None);
        assert_eq!(EnhancedCode::parse("3.1.1"), None);
    }
}
