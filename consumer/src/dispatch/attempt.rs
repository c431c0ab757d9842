//! Making the call: one signed request for one delivery, and what came of it as facts for the
//! decision ([`Reply`]) and for the attempt log ([`Attempt`]).

use std::time::Instant;

use chrono::Utc;
use outbox_core::signature::{sign_headers, Secret};

use crate::delivery::decision::Reply;
use crate::delivery::store::{Attempt, Claimed};
use crate::webhook_client::WebhookClient;

/// Longest stored excerpt of a receiver's response body.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// What one call produced.
#[derive(Debug)]
pub struct Made {
    pub reply: Reply,
    /// The attempt as logged: number, status, latency, error, response excerpt, start time.
    pub attempt: Attempt,
}

/// Why an attempt got no answer.
enum Failed {
    /// The request was sent (or tried to be) and failed: connect, timeout, reading, refused target.
    Sending(String),
    /// The request could not be built: see [`Reply::Unsendable`].
    Unsendable(String),
}

/// Sends delivery `d` once, as attempt `d.attempts + 1`.
pub async fn make(http: &WebhookClient, d: &Claimed) -> Made {
    let number = d.attempts + 1;
    let at = Utc::now();
    let started = Instant::now();
    let response = match request(http, d, at.timestamp()).await {
        Ok(request) => request.send().await.map_err(|e| {
            if e.is_builder() {
                Failed::Unsendable(describe(e))
            } else {
                Failed::Sending(describe(e))
            }
        }),
        Err(error) => Err(error),
    };
    let (reply, status, excerpt, error) = match response {
        Ok(response) => {
            let status = response.status();
            let reply = Reply::answered(status.as_u16(), response.headers(), Utc::now());
            let (excerpt, body_error) = read_excerpt(response).await;
            let error = match (status.is_success(), body_error) {
                (true, _) => None,
                (false, Some(e)) => Some(format!("HTTP {}: {e}", status.as_u16())),
                (false, None) => Some(format!("HTTP {}", status.as_u16())),
            };
            (reply, Some(status.as_u16() as i32), excerpt, error)
        }
        Err(Failed::Sending(error)) => (Reply::NoAnswer, None, None, Some(error)),
        Err(Failed::Unsendable(error)) => (
            Reply::Unsendable,
            None,
            None,
            Some(format!("the request cannot be built: {error}")),
        ),
    };
    Made {
        reply,
        attempt: Attempt {
            number,
            status,
            latency_ms: started.elapsed().as_millis().min(i32::MAX as u128) as i32,
            error,
            response_body: excerpt,
            at,
        },
    }
}

/// The signed request: the body bytes exactly as signed, the current secret and, during a
/// rotation's grace period, the previous one. Every value that becomes a header is checked
/// here, so a delivery recorded before those checks existed fails as unsendable rather than
/// as a request error charged to the endpoint. A correlation id that is no valid header is
/// replaced by the event id, as a missing one is. A target the address guard refuses is the
/// endpoint's failure (its URL), retried on schedule.
async fn request(
    http: &WebhookClient,
    d: &Claimed,
    timestamp: i64,
) -> Result<reqwest::RequestBuilder, Failed> {
    outbox_core::envelope::check_event_id(&d.event_id)
        .map_err(|e| Failed::Unsendable(format!("{e}: {:?}", d.event_id)))?;
    let correlation_id = d
        .correlation_id
        .as_deref()
        .filter(|c| outbox_core::envelope::check_correlation_id(c).is_ok())
        .unwrap_or(&d.event_id);
    let current = Secret::parse(&d.secret)
        .map_err(|e| Failed::Unsendable(format!("the endpoint's secret is unusable: {e}")))?;
    let previous = d
        .previous_secret
        .as_deref()
        .and_then(|s| Secret::parse(s).ok());
    let secrets: Vec<&Secret> = std::iter::once(&current).chain(previous.as_ref()).collect();
    let mut request = http
        .post(&d.url)
        .await
        .map_err(|e| Failed::Sending(e.to_string()))?
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("x-correlation-id", correlation_id);
    for (name, value) in sign_headers(&secrets, &d.event_id, timestamp, &d.body) {
        request = request.header(name, value);
    }
    if let Some((name, value)) = crate::trace_context::webhook_header() {
        request = request.header(name, value);
    }
    Ok(request.body(d.body.clone()))
}

fn describe(error: reqwest::Error) -> String {
    use std::error::Error;
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {error}");
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads at most [`RESPONSE_EXCERPT_BYTES`] of the response body.
async fn read_excerpt(mut response: reqwest::Response) -> (Option<String>, Option<String>) {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                buffer.extend_from_slice(&chunk);
                if buffer.len() >= RESPONSE_EXCERPT_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            Err(error) => return (excerpt(&buffer), Some(describe(error))),
        }
    }
    (excerpt(&buffer), None)
}

fn excerpt(bytes: &[u8]) -> Option<String> {
    if bytes.is_empty() {
        return None;
    }
    let cut = &bytes[..bytes.len().min(RESPONSE_EXCERPT_BYTES)];
    Some(String::from_utf8_lossy(cut).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b""), None);
        let long = vec![b'a'; 5000];
        assert_eq!(
            excerpt(&long).map(|s| s.len()),
            Some(RESPONSE_EXCERPT_BYTES)
        );
    }
}
