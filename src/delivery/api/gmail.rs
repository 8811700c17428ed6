//! The Gmail API: `POST {api_url}/upload/gmail/v1/users/me/messages/send?uploadType=media`, the raw
//! message as the body (`message/rfc822`, streamed), up to 35 MB. `200` with the message's `id` is
//! success.

use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};

use super::answer::reading;
use super::{Api, Outgoing};
use crate::config::Account;
use crate::delivery::status::Status;

/// The most `messages.send` takes (its discovery document's `maxSize`: 35 MiB).
pub const MAX_MESSAGE: u64 = 36_700_160;

pub async fn send(api: &Api, account: &Account, message: &Outgoing) -> Status {
    // The size was checked with the header section (`envelope::check`).
    let url = format!(
        "{}/upload/gmail/v1/users/me/messages/send?uploadType=media",
        account.provider.api_url
    );
    let answer = api
        .call(account, |client, token| {
            client
                .post(&url)
                .bearer_auth(token)
                .header(CONTENT_TYPE, "message/rfc822")
                .header(CONTENT_LENGTH, message.len())
                .body(reqwest::Body::wrap_stream(message.stream()))
        })
        .await;
    match answer {
        Ok(a) if reading(&a) == super::answer::Reading::Sent => super::sent(&a),
        Ok(a) => api.refused(account, &a),
        Err(status) => status,
    }
}
