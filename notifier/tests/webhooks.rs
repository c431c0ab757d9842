//! The notifier as a sender and an operator see it: real PostgreSQL (a fresh database per test),
//! a real SMTP server and a chat API that can be told to fail.

mod support;

use std::time::Duration;

use clap::{CommandFactory, Parser};
use outbox_core::breaker::BreakerState;
use outbox_core::signature::Secret;
use outbox_core::testing::{eventually, RouteCall, TestDb};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::*;

const NOTIFY: &str = "/webhooks/notify";
const LOGGER: &str = "/webhooks/logger";

#[tokio::test]
async fn a_signed_webhook_notifies_once_by_email_and_chat_and_its_duplicate_not_at_all() {
    let (smtp, chat, app) = spawn_with_channels(&[]).await;
    let id = new_event_id();

    let (status, body) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["received"], true);
    assert_eq!(
        body["notifications"],
        json!({"email": "sent", "chat": "sent"})
    );

    let mails = eventually("one email", Duration::from_secs(5), || async {
        Some(smtp.mails()).filter(|m| !m.is_empty())
    })
    .await;
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].contains(&format!("Subject: [outbox] message.created {id}")),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("To: ops@example.com"), "{}", mails[0]);
    let messages = chat.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["bot"], format!("bot{BOT_TOKEN}"));
    assert_eq!(messages[0]["body"]["chat_id"], CHAT_ID);
    assert!(messages[0]["body"]["text"]
        .as_str()
        .unwrap_or_default()
        .contains(&id));

    // The sender retries (say its acknowledgement was lost): the same id changes nothing.
    let (status, body) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"duplicate": true}));
    assert_eq!(smtp.mails().len(), 1, "no second email");
    assert_eq!(chat.messages().len(), 1, "no second chat message");

    let events = app.admin().events("").await.unwrap().events;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].webhook_id, id);
    assert_eq!(events[0].route, NOTIFY);
    assert_eq!(events[0].event_type.as_deref(), Some("message.created"));
    assert_eq!(events[0].correlation_id.as_deref(), Some("req_test"));
    assert_eq!(events[0].payload["data"]["content"], "hello");

    let notifications = app.admin().notifications_of(&id).await.unwrap();
    let mut sent: Vec<(String, String)> = notifications
        .notifications
        .into_iter()
        .map(|n| (n.channel, n.outcome))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            ("chat".into(), "sent".into()),
            ("email".into(), "sent".into())
        ]
    );

    app.assert_received(NOTIFY, "accepted", 1.0).await;
    app.assert_received(NOTIFY, "duplicate", 1.0).await;
    for channel in ["email", "chat"] {
        let labels = [("channel", channel), ("outcome", "sent")];
        app.assert_metric("notifier_notifications_total", &labels, 1.0)
            .await;
        let closed = [("channel", channel), ("state", "closed")];
        app.assert_metric("notifier_circuit_breaker_state", &closed, 1.0)
            .await;
    }
}

#[tokio::test]
async fn replays_tampered_bodies_and_missing_signatures_are_refused_and_nothing_is_stored() {
    let (smtp, chat, app) = spawn_with_channels(&[]).await;
    let id = new_event_id();
    let body = envelope(&id);

    // A captured request replayed ten minutes later.
    let old = now() - 600;
    let (status, answer) = app
        .send_signed(NOTIFY, &id, &body, old, &[&app.secret], Headers::Standard)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["code"], "stale_timestamp");

    // Signed, then changed on the way.
    let timestamp = now();
    let mut request = app.http.post(format!("{}{NOTIFY}", app.base));
    for (name, value) in outbox_core::signature::sign_headers(&[&app.secret], &id, timestamp, &body)
    {
        request = request.header(name, value);
    }
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let response = request.body(tampered).send().await.expect("answer");
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["code"], "invalid_signature");
    assert!(answer["error"].is_string());

    // Signed with a secret the notifier does not know.
    let stranger = Secret::generate();
    let (status, answer) = app
        .send_signed(LOGGER, &id, &body, now(), &[&stranger], Headers::Older)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["code"], "invalid_signature");

    // Not signed at all.
    let response = app
        .http
        .post(format!("{}{NOTIFY}", app.base))
        .body(body.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(answer["code"], "missing_signature");

    // Signed, but not JSON: refused only after the signature was checked.
    let garbage = b"{not json".to_vec();
    let (status, answer) = app
        .send_signed(
            NOTIFY,
            &id,
            &garbage,
            now(),
            &[&app.secret],
            Headers::Standard,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["code"], "malformed_json");

    assert_eq!(app.count("select count(*) from received_events").await, 0);
    assert_eq!(app.count("select count(*) from notifications").await, 0);
    assert!(smtp.mails().is_empty());
    assert_eq!(chat.attempts(), 0);
    app.assert_received(NOTIFY, "stale", 1.0).await;
    app.assert_received(NOTIFY, "bad_signature", 2.0).await;
    app.assert_received(NOTIFY, "invalid", 1.0).await;

    // The genuine request still goes through afterwards.
    let (status, _) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(smtp.mails().len(), 1);
}

#[tokio::test]
async fn a_failing_chat_opens_its_breaker_the_sender_gets_503_and_recovery_closes_it() {
    let (smtp, chat, app) = spawn_with_channels(&[]).await;
    let first = new_event_id();
    chat.fail(true);

    // The sender retries the same webhook; each attempt fails on the chat channel only.
    for attempt in 1..=5 {
        let (status, body) = app.deliver(NOTIFY, &first).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "attempt {attempt}: {body}");
        assert_eq!(body["code"], "notification_failed");
    }
    assert_eq!(chat.attempts(), 5);
    assert_eq!(
        smtp.mails().len(),
        1,
        "the email went out once, on the first attempt"
    );
    let breaker = app.breaker("chat").await.view.breaker;
    assert_eq!(breaker.state, BreakerState::Open, "{breaker:?}");
    assert_eq!(breaker.failure_count, 5);
    assert!(breaker.opened_at.is_some());
    let email = app.breaker("email").await.view.breaker;
    assert_eq!(email.state, BreakerState::Closed);

    // Open: the chat API is not called and the sender is told to come back later.
    let response = app
        .http
        .post(format!("{}{NOTIFY}", app.base))
        .header("content-type", "application/json")
        .headers({
            let mut h = reqwest::header::HeaderMap::new();
            for (name, value) in outbox_core::signature::sign_headers(
                &[&app.secret],
                &first,
                now(),
                &envelope(&first),
            ) {
                h.insert(name, value.parse().expect("header value"));
            }
            h
        })
        .body(envelope(&first))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(body["code"], "channel_unavailable");
    assert_eq!(chat.attempts(), 5);
    let open = [("channel", "chat"), ("state", "open")];
    app.assert_metric("notifier_circuit_breaker_state", &open, 1.0)
        .await;

    // The chat API recovers; once the open period has passed, the retry is the probe.
    chat.fail(false);
    eventually(
        "the retried webhook is accepted",
        Duration::from_secs(10),
        || async {
            let (status, _) = app.deliver(NOTIFY, &first).await;
            (status == StatusCode::OK).then_some(())
        },
    )
    .await;
    assert_eq!(chat.messages().len(), 1);
    assert_eq!(
        smtp.mails().len(),
        1,
        "the retries never sent a second email"
    );
    let chat_breaker = app.breaker("chat").await.view.breaker;
    assert_eq!(chat_breaker.state, BreakerState::HalfOpen);

    // A second successful probe closes it.
    let second = new_event_id();
    let (status, body) = app.deliver(NOTIFY, &second).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let breaker = app.breaker("chat").await.view.breaker;
    assert_eq!(breaker.state, BreakerState::Closed, "{breaker:?}");
    assert_eq!(breaker.failure_count, 0);
    assert_eq!(chat.messages().len(), 2);
    assert_eq!(smtp.mails().len(), 2);
    let closed = [("channel", "chat"), ("state", "closed")];
    app.assert_metric("notifier_circuit_breaker_state", &closed, 1.0)
        .await;

    // Every attempt is on record.
    let count = |outcome: &str| {
        format!("select count(*) from notifications where webhook_id = '{first}' and channel = 'chat' and outcome = '{outcome}'")
    };
    assert_eq!(app.count(&count("failed")).await, 5);
    assert_eq!(app.count(&count("sent")).await, 1);
    assert!(app.count(&count("rejected_open")).await >= 1);
    let sent_emails = format!(
        "select count(*) from notifications where webhook_id = '{first}' and channel = 'email'"
    );
    assert_eq!(app.count(&sent_emails).await, 1);
    let rejected = [("channel", "chat"), ("outcome", "rejected_open")];
    assert!(app.metric("notifier_notifications_total", &rejected).await >= Some(1.0));
}

#[tokio::test]
async fn the_logger_route_takes_the_older_headers_and_any_one_of_several_signatures() {
    let app = spawn_app(&[]).await;
    let id = new_event_id();
    let body = envelope(&id);

    // A sender in the middle of a rotation signs with a new secret the notifier does not know yet
    // and the old one it knows, using the older header convention.
    let rotated = Secret::generate();
    let (status, answer) = app
        .send_signed(
            LOGGER,
            &id,
            &body,
            now(),
            &[&rotated, &app.secret],
            Headers::Older,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["received"], true);
    let (status, answer) = app
        .send_signed(LOGGER, &id, &body, now(), &[&app.secret], Headers::Standard)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({"duplicate": true}));

    // The same event delivered to the notify route too (another endpoint of the consumer) is
    // that route's first delivery, not a duplicate. No channel is configured here.
    let (status, answer) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["received"], true);

    let events = app.admin().events(&format!("?route={LOGGER}")).await;
    assert_eq!(events.unwrap().events.len(), 1);
    assert_eq!(app.count("select count(*) from received_events").await, 2);
    assert_eq!(app.count("select count(*) from notifications").await, 0);

    // Pagination: newest first, one page at a time.
    let page = app.admin().events("?limit=1").await.unwrap();
    assert_eq!(page.events[0].route, NOTIFY);
    let before = page.next_before.expect("a next page");
    let query = format!("?limit=1&before={before}");
    let page = app.admin().events(&query).await.unwrap();
    assert_eq!(page.events[0].route, LOGGER);
    let refused = app.admin().events("?limit=0").await.unwrap_err();
    assert_eq!(
        (refused.status, refused.code.as_str()),
        (400, "invalid_limit")
    );
}

#[tokio::test]
async fn an_operator_resets_an_open_breaker() {
    let chat = ChatServer::start().await;
    let app = spawn_app(&[
        "--chat-api-url",
        &chat.base,
        "--chat-bot-token",
        BOT_TOKEN,
        "--chat-id",
        CHAT_ID,
        "--breaker-open-for",
        "1h",
    ])
    .await;
    chat.fail(true);
    for _ in 0..5 {
        let (status, _) = app.deliver(NOTIFY, &new_event_id()).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
    assert_eq!(
        app.breaker("chat").await.view.breaker.state,
        BreakerState::Open
    );
    assert!(!app.breaker("email").await.enabled);

    let refused = app.admin().reset_breaker("fax").await.unwrap_err();
    assert_eq!(
        (refused.status, refused.code.as_str()),
        (400, "unknown_channel")
    );

    let after = app.admin().reset_breaker("chat").await.unwrap();
    let chat_breaker = find_channel(after, "chat").view.breaker;
    assert_eq!(chat_breaker.state, BreakerState::Closed);
    assert_eq!(chat_breaker.failure_count, 0);

    chat.fail(false);
    let (status, _) = app.deliver(NOTIFY, &new_event_id()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn it_starts_and_reports_not_ready_while_postgres_is_down() {
    let db = TestDb::create().await;
    let app = spawn_app_on(db, "postgres://postgres@127.0.0.1:1/nowhere", &[]).await;
    let (status, _) = app.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["postgres"], false);
    let (status, body) = app.deliver(LOGGER, &new_event_id()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "unavailable");
}

#[test]
fn help_documents_every_setting() {
    let help = Cli::command().render_long_help().to_string();
    for name in [
        "DATABASE_URL",
        "LISTEN_ADDR",
        "WEBHOOK_SECRET",
        "WEBHOOK_TOLERANCE",
        "BREAKER_FAILURES",
        "BREAKER_OPEN_FOR",
        "BREAKER_SUCCESSES",
        "SMTP_HOST",
        "SMTP_PORT",
        "SMTP_FROM",
        "SMTP_TO",
        "CHAT_API_URL",
        "CHAT_BOT_TOKEN",
        "CHAT_ID",
        "NOTIFY_TIMEOUT",
        "ADMIN_TOKEN",
    ] {
        assert!(
            help.contains(&format!("[env: {name}")),
            "--help lacks {name}"
        );
    }
}

#[tokio::test]
async fn a_missing_or_invalid_secret_is_a_configuration_error() {
    for wrong in ["hunter2", "whsec_hunter2!"] {
        let Err(error) = Cli::try_parse_from(["notifier", "--webhook-secret", wrong]) else {
            panic!("{wrong} is refused");
        };
        let message = error.render().to_string();
        assert!(message.contains("WEBHOOK_SECRET"), "{message}");
        assert!(
            !message.contains("hunter2"),
            "the refusal shows the value: {message}"
        );
    }
    assert!(Cli::try_parse_from(["notifier", "--webhook-secret", ","]).is_err());
    let smtp_without_recipients = Cli::try_parse_from([
        "notifier",
        "--webhook-secret",
        Secret::generate().as_str(),
        "--smtp-host",
        "127.0.0.1",
    ])
    .expect("parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let result = notifier::run(
        smtp_without_recipients.config,
        listener,
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    let error = result.expect_err("refused at start");
    assert!(error.to_string().contains("SMTP_TO"), "{error}");
}

#[tokio::test]
async fn concurrent_deliveries_of_one_webhook_notify_once() {
    let (smtp, chat, app) = spawn_with_channels(&[]).await;
    let id = new_event_id();

    // Two consumer instances (or a retry after a timeout) deliver the same event at once.
    let answers = futures::future::join_all((0..6).map(|_| app.deliver(NOTIFY, &id))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let first = answers
        .iter()
        .filter(|(_, b)| b["received"] == true)
        .count();
    let duplicates = answers
        .iter()
        .filter(|(_, b)| b["duplicate"] == true)
        .count();
    assert_eq!((first, duplicates), (1, 5));
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(chat.messages().len(), 1);
}

#[tokio::test]
async fn while_smtp_is_down_the_retry_sends_only_the_missing_email() {
    let (smtp, chat, app) = spawn_with_channels(&[]).await;
    let port = smtp.port;
    drop(smtp);
    let id = new_event_id();

    let (status, body) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("email"),
        "{body}"
    );
    assert_eq!(
        chat.messages().len(),
        1,
        "the chat channel does not wait for email"
    );
    assert_eq!(app.count("select count(*) from received_events").await, 0);
    assert_eq!(app.breaker("email").await.view.breaker.failure_count, 1);

    let smtp = SmtpServer::start_on(port).await;
    let (status, body) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["notifications"],
        json!({"email": "sent", "chat": "already_sent"})
    );
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(chat.messages().len(), 1, "no second chat message");
    assert_eq!(app.breaker("email").await.view.breaker.failure_count, 0);
}

#[tokio::test]
async fn an_absurd_timestamp_or_id_is_refused_not_a_crash() {
    let app = spawn_app(&[]).await;
    let id = new_event_id();
    for (timestamp, code) in [
        (i64::MIN, "invalid_timestamp"),
        (i64::MAX, "stale_timestamp"),
    ] {
        let (status, body) = app
            .send_signed(
                LOGGER,
                &id,
                &envelope(&id),
                timestamp,
                &[&app.secret],
                Headers::Standard,
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{timestamp}: {body}");
        assert_eq!(body["code"], code);
    }
    // Signed, but an id no dedupe key should be.
    let long_id = "e".repeat(300);
    let (status, body) = app.deliver(LOGGER, &long_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "invalid_webhook_id");
    assert_eq!(app.count("select count(*) from received_events").await, 0);
}

#[test]
fn help_shows_no_secret_values() {
    outbox_core::testing::assert_help_hides_secrets(env!("CARGO_BIN_EXE_notifier"));
}

#[tokio::test]
async fn with_admin_token_stored_events_and_breakers_need_it_and_webhooks_stay_open() {
    let app = spawn_app(&["--admin-token", "s3cret"]).await;
    eventually("the notifier is ready", Duration::from_secs(10), || async {
        let r = app
            .http
            .get(format!("{}/ready", app.base))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    outbox_core::testing::assert_admin_token_guards(
        &app.base,
        "s3cret",
        notifier::OPEN_ROUTES,
        &every_route(&app),
    )
    .await;
    // The events sent above were stored, and the token reads them.
    let events = app.admin().with_token("s3cret").events("").await.unwrap();
    assert_eq!(events.events.len(), 2, "{events:?}");
}

#[tokio::test]
async fn the_openapi_document_is_valid_and_lists_every_route_with_typed_answers() {
    let app = spawn_app(&[]).await;
    let document =
        outbox_core::testing::assert_openapi_lists_every_route(&app.base, &every_route(&app)).await;
    for (method, path) in outbox_core::testing::operations(&document) {
        if path == "/openapi.json" {
            continue;
        }
        let answer = &document["paths"][&path][method.to_lowercase()]["responses"]["200"];
        assert!(
            answer["content"]["application/json"]["schema"]["$ref"].is_string(),
            "{method} {path} answers 200 with an untyped body: {answer}"
        );
    }
    // The breaker JSON is the shared view: one name for the instant a probe may go.
    let breaker = &document["components"]["schemas"]["BreakerView"];
    assert!(breaker.to_string().contains("\"probe_at\""), "{breaker}");
    // The reset route's channel names are the channels the notifier has.
    assert_eq!(
        document["components"]["schemas"]["ChannelName"]["enum"],
        json!(["email", "chat"])
    );
}

/// Every route the notifier serves, called so that it reaches its handler (the receiving
/// routes with a good signature), with the status the handler answers.
fn every_route(app: &App) -> Vec<RouteCall> {
    // The receiving routes are guarded by the webhook signature instead of the token.
    let signed = |route: &'static str| {
        let id = new_event_id();
        let body = envelope(&id);
        let headers = outbox_core::signature::sign_headers(&[&app.secret], &id, now(), &body)
            .into_iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        RouteCall {
            body: Some(body),
            headers,
            ..RouteCall::new("POST", route, route, 200)
        }
    };
    RouteCall::served([
        signed(LOGGER),
        signed(NOTIFY),
        RouteCall::get("/webhooks/events", 200),
        RouteCall::get("/notifications", 200),
        RouteCall::get("/circuit-breaker", 200),
        RouteCall::new(
            "POST",
            "/circuit-breaker/reset",
            "/circuit-breaker/reset",
            200,
        ),
    ])
}

#[tokio::test]
async fn a_timestamp_not_written_as_plain_digits_is_refused_however_it_was_signed() {
    let app = spawn_app(&[]).await;
    let id = new_event_id();
    let body = envelope(&id);
    let ts = now().to_string();
    for convention in [Headers::Standard, Headers::Older] {
        for written in [format!("+{ts}"), format!("0{ts}")] {
            // Signed over the text sent, or over the number it stands for (what a lenient
            // receiver re-formats and checks): either way the header is not a timestamp.
            for signed in [written.as_str(), ts.as_str()] {
                let (status, answer) = app
                    .send_with_timestamp_text(NOTIFY, &id, &body, (&written, signed), convention)
                    .await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{written:?}: {answer}");
                assert_eq!(answer["code"], "invalid_timestamp", "{written:?}: {answer}");
            }
        }
        // HTTP drops the spaces around a header value (RFC 9110 5.5), so " ts" arrives as "ts":
        // under a MAC over " ts" it is refused for its signature.
        let written = format!(" {ts}");
        let (status, answer) = app
            .send_with_timestamp_text(NOTIFY, &id, &body, (&written, &written), convention)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
        assert_eq!(answer["code"], "invalid_signature", "{answer}");
    }
    assert_eq!(app.count("select count(*) from received_events").await, 0);
    // The same request with the timestamp as a sender writes it goes through.
    let (status, answer) = app
        .send_with_timestamp_text(NOTIFY, &id, &body, (&ts, &ts), Headers::Older)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn a_stale_timestamp_is_explained_as_in_the_past_or_in_the_future() {
    let app = spawn_app(&[]).await;
    let id = new_event_id();
    let body = envelope(&id);
    for (offset, words) in [(-600, "s in the past"), (600, "s in the future")] {
        let (status, answer) = app
            .send_signed(
                NOTIFY,
                &id,
                &body,
                now() + offset,
                &[&app.secret],
                Headers::Standard,
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer["code"], "stale_timestamp");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(words) && message.contains("tolerance of 300 s"),
            "{offset}: {message}"
        );
        // 600 s off, give or take the second that passed while sending.
        assert!(
            message.contains(" 600 s ")
                || message.contains(" 599 s ")
                || message.contains(" 601 s "),
            "{offset}: {message}"
        );
    }
}

#[tokio::test]
async fn with_a_pool_of_one_connection_a_notification_is_delivered() {
    let (smtp, chat, app) = spawn_with_channels(&["--database-pool-size", "1"]).await;
    let id = new_event_id();

    let (status, body) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["notifications"],
        json!({"email": "sent", "chat": "sent"})
    );
    let (status, body) = app.deliver(NOTIFY, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"duplicate": true}));
    assert_eq!(chat.messages().len(), 1);
    eventually("one email", Duration::from_secs(5), || async {
        Some(smtp.mails()).filter(|m| m.len() == 1)
    })
    .await;
    // The one connection went back to the pool: the read routes still answer.
    let events = app.admin().events("").await.unwrap();
    assert_eq!(events.events.len(), 1);
}
