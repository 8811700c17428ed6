//! The DATA phase of a session: body bytes through the [`crate::smtp::data::DataDecoder`] (or
//! around it, for lines already in wire form), out as chunks, refused at the end when the message
//! is too large or has a bare line ending that the config refuses.

use bytes::Buf;

use super::params::decoder_run;
use super::{Action, Phase, Refusal, Session, Waiting, BODY_LINE_WAIT};
use crate::smtp::body::BodyChunk;

impl Session {
    /// Feeds buffered input to the DATA decoder; returns false when more input is needed.
    ///
    /// At a line start, the whole well-formed lines at hand (CRLF endings, none starting with ".")
    /// are their own decoding: they go on as one chunk sharing the input buffer, and the decoder's
    /// state is unchanged by them (it has just seen a CRLF either way). Everything else, and the
    /// end of data, goes through the decoder.
    pub(super) fn step_data(&mut self) -> bool {
        let Phase::Data(data) = &mut self.phase else {
            return false;
        };
        if self.input.is_empty() {
            return false;
        }
        let take = if data.decoder.at_line_start() {
            let lines = crate::smtp::body::verbatim_lines(&self.input, false);
            if lines > 0 {
                let chunk = BodyChunk::wire_lines(self.input.split_to(lines).freeze());
                self.body_chunk(chunk);
                return true;
            }
            match decoder_run(&self.input) {
                Some(run) => run,
                None if self.input.len() < BODY_LINE_WAIT => return false,
                None => self.input.len(),
            }
        } else {
            self.input.len()
        };
        data.decoded.reserve(take);
        let (consumed, done) = data.decoder.decode(&self.input[..take], &mut data.decoded);
        self.input.advance(consumed);
        if self.config.reject_bare_line_endings
            && data.decoder.saw_bare_line_ending()
            && data.refused.is_none()
        {
            data.refused = Some(Refusal::BareLineEnding);
            self.out.push_back(Action::AbortTransaction);
        }
        if !data.decoded.is_empty() {
            let chunk = BodyChunk::decoded(std::mem::take(&mut data.decoded));
            self.body_chunk(chunk);
        }
        if done {
            let refused = match &self.phase {
                Phase::Data(data) => data.refused,
                _ => None,
            };
            match refused {
                None => self.wait(Action::EndOfData, Waiting::EndOfData),
                Some(why) => {
                    self.phase = Phase::Command;
                    self.reset_transaction();
                    match why {
                        Refusal::TooBig => self.reply(
                            552,
                            format!(
                                "5.3.4 Message size exceeds the limit of {} bytes",
                                self.config.max_message_bytes
                            ),
                        ),
                        Refusal::BareLineEnding => self.reply(
                            554,
                            "5.5.2 Bare CR or LF in the message; lines must end with CRLF",
                        ),
                    }
                }
            }
        }
        true
    }

    /// Hands a body chunk on, or drops it once the message is refused (over the size limit, say).
    pub(super) fn body_chunk(&mut self, chunk: BodyChunk) {
        let Phase::Data(data) = &mut self.phase else {
            return;
        };
        data.size += chunk.len();
        if data.refused.is_some() {
            return;
        }
        if data.size <= self.config.max_message_bytes {
            self.out.push_back(Action::BodyChunk(chunk));
        } else {
            data.refused = Some(Refusal::TooBig);
            self.out.push_back(Action::AbortTransaction);
        }
    }
}
