//! The notification channels: email over plain SMTP (lettre) and a chat over HTTP in the Telegram
//! Bot API style. A channel only sends; breakers and bookkeeping live in `routes`.

use std::time::Duration;

use lettre::message::{Mailbox, Mailboxes};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{json, Value};

use crate::Config;

/// The longest chat text sent; Telegram refuses messages above 4096 characters.
const MAX_CHAT_CHARS: usize = 3500;

/// Why a configuration of channels was refused at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("SMTP_HOST is set, so SMTP_TO must name at least one recipient")]
    MissingRecipients,
    #[error("SMTP_TO is not a list of email addresses: {0}")]
    Recipients(String),
    #[error("SMTP_FROM is not an email address: {0}")]
    Sender(String),
    #[error("CHAT_BOT_TOKEN is set, so CHAT_ID must be set too")]
    MissingChatId,
    #[error("CHAT_API_URL is not an http(s) URL: {0}")]
    ChatUrl(String),
    #[error("cannot build the HTTP client of the chat channel: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Why one notification was not delivered. Every case counts as a failure of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the SMTP server refused or could not be reached: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("cannot build the email: {0}")]
    Email(#[from] lettre::error::Error),
    #[error("the chat API could not be reached: {0}")]
    ChatUnreachable(reqwest::Error),
    #[error("the chat API answered {status}: {body}")]
    ChatRefused { status: u16, body: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// What a notification says about one event.
#[derive(Debug, Clone)]
pub struct Notice<'a> {
    pub webhook_id: &'a str,
    pub event_type: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub payload: &'a Value,
}

impl Notice<'_> {
    fn title(&self) -> String {
        format!("{} {}", self.event_type.unwrap_or("event"), self.webhook_id)
    }

    fn details(&self) -> String {
        let mut text = format!("Event {}", self.webhook_id);
        if let Some(t) = self.event_type {
            text.push_str(&format!(" ({t})"));
        }
        if let Some(c) = self.correlation_id {
            text.push_str(&format!("\nCorrelation id: {c}"));
        }
        let payload = serde_json::to_string_pretty(self.payload).unwrap_or_default();
        text.push_str("\n\n");
        text.push_str(&payload);
        text
    }
}

/// A configured channel.
#[derive(Clone)]
pub enum Channel {
    Email(Email),
    Chat(Chat),
}

impl Channel {
    /// The channel's name: its breaker's name, its metric label and its `notifications.channel`.
    pub fn name(&self) -> &'static str {
        match self {
            Channel::Email(_) => EMAIL,
            Channel::Chat(_) => CHAT,
        }
    }

    /// Sends one notification, within the configured timeout. `Ok` means the server accepted it.
    pub async fn send(&self, notice: &Notice<'_>) -> Result<(), ChannelError> {
        match self {
            Channel::Email(email) => email.send(notice).await,
            Channel::Chat(chat) => chat.send(notice).await,
        }
    }
}

/// Name of the email channel.
pub const EMAIL: &str = "email";
/// Name of the chat channel.
pub const CHAT: &str = "chat";
/// Every channel name, configured or not.
pub const ALL: [&str; 2] = [EMAIL, CHAT];

/// The configured channels, email first; a channel whose settings are absent is left out.
pub fn from_config(config: &Config) -> Result<Vec<Channel>, ConfigError> {
    let mut channels = Vec::new();
    if let Some(host) = config.smtp_host.as_deref().filter(|h| !h.trim().is_empty()) {
        let to = config
            .smtp_to
            .as_deref()
            .filter(|t| !t.trim().is_empty())
            .ok_or(ConfigError::MissingRecipients)?;
        let to: Mailboxes = to
            .parse()
            .map_err(|e: lettre::address::AddressError| ConfigError::Recipients(e.to_string()))?;
        let from: Mailbox = config
            .smtp_from
            .parse()
            .map_err(|e: lettre::address::AddressError| ConfigError::Sender(e.to_string()))?;
        // Plain SMTP: the notifier talks to a relay next to it (a local MTA or a test server).
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.trim())
            .port(config.smtp_port)
            .timeout(Some(config.notify_timeout))
            .build();
        channels.push(Channel::Email(Email {
            transport,
            from,
            to,
            timeout: config.notify_timeout,
        }));
    }
    if let Some(token) = config
        .chat_bot_token
        .as_deref()
        .filter(|t| !t.trim().is_empty())
    {
        let chat_id = config
            .chat_id
            .as_deref()
            .filter(|c| !c.trim().is_empty())
            .ok_or(ConfigError::MissingChatId)?;
        let base = config.chat_api_url.trim().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ConfigError::ChatUrl(base.to_owned()));
        }
        channels.push(Channel::Chat(Chat {
            http: reqwest::Client::builder()
                .timeout(config.notify_timeout)
                .build()?,
            url: format!("{base}/bot{}/sendMessage", token.trim()),
            chat_id: chat_id.trim().to_owned(),
            timeout: config.notify_timeout,
        }));
    }
    Ok(channels)
}

/// Email to fixed recipients over plain SMTP.
#[derive(Clone)]
pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Mailboxes,
    timeout: Duration,
}

impl Email {
    async fn send(&self, notice: &Notice<'_>) -> Result<(), ChannelError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(format!("[outbox] {}", notice.title()))
            // The same Message-ID for the same event lets mail clients fold the rare duplicate
            // (an email sent, then the process died before recording it).
            .message_id(Some(format!(
                "<{}.notify@outbox-notifier>",
                message_id_part(notice.webhook_id)
            )));
        for to in self.to.iter() {
            builder = builder.to(to.clone());
        }
        let message = builder.body(notice.details())?;
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(result) => result.map(|_| ()).map_err(ChannelError::from),
            Err(_) => Err(ChannelError::Timeout(self.timeout)),
        }
    }
}

/// The webhook id reduced to characters a Message-ID may hold.
fn message_id_part(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(128)
        .collect()
}

/// A chat message through a Telegram-style Bot API: `POST {base}/bot{token}/sendMessage` with
/// `{"chat_id", "text"}`.
#[derive(Clone)]
pub struct Chat {
    http: reqwest::Client,
    /// Holds the bot token: never logged, and stripped from errors.
    url: String,
    chat_id: String,
    timeout: Duration,
}

impl Chat {
    async fn send(&self, notice: &Notice<'_>) -> Result<(), ChannelError> {
        let text: String = notice.details().chars().take(MAX_CHAT_CHARS).collect();
        let response = self
            .http
            .post(&self.url)
            .json(&json!({"chat_id": self.chat_id, "text": text}))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| self.unreachable(e))?;
        // Telegram answers {"ok": false, ...} for refused messages; other APIs may answer 2xx alone.
        let refused = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("ok").and_then(Value::as_bool))
            == Some(false);
        if status.is_success() && !refused {
            Ok(())
        } else {
            Err(ChannelError::ChatRefused {
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            })
        }
    }

    fn unreachable(&self, error: reqwest::Error) -> ChannelError {
        if error.is_timeout() {
            ChannelError::Timeout(self.timeout)
        } else {
            // The URL holds the bot token.
            ChannelError::ChatUnreachable(error.without_url())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_keep_only_safe_characters() {
        assert_eq!(message_id_part("evt_01J<x>@y z"), "evt_01Jxyz");
    }
}
