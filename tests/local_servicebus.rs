//! The real `azure_messaging_servicebus` 0.21 client against the local Service Bus endpoint, through
//! a wrapping `HttpClient` that sends `https://{ns}.servicebus.windows.net/...` to loopback.

use azure_core_legacy::{HttpClient, Request, Response};
use azure_messaging_servicebus::prelude::*;
use azure_messaging_servicebus::service_bus::{SendMessageOptions, SettableBrokerProperties};
use chrono::Utc;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use vmbackup::clock::Clock;
use vmbackup::local::queue::{Queue, QueueOptions};
use vmbackup::local::servicebus_endpoint::{self, EndpointConfig, RunningEndpoint};

const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "local-test-key";
const QUEUE: &str = "restore-requests";

/// Rewrites the Service Bus namespace URL to the loopback endpoint, as the handler will.
#[derive(Debug)]
struct LoopbackClient {
    inner: Arc<dyn HttpClient>,
    addr: SocketAddr,
}

#[async_trait::async_trait]
impl HttpClient for LoopbackClient {
    async fn execute_request(&self, request: &Request) -> azure_core_legacy::Result<Response> {
        let mut request = request.clone();
        let url = request.url_mut();
        if url
            .host_str()
            .is_some_and(|h| h.ends_with(".servicebus.windows.net"))
        {
            url.set_scheme("http").expect("https to http is allowed");
            url.set_host(Some("127.0.0.1")).expect("an IP host");
            url.set_port(Some(self.addr.port())).expect("a port");
        }
        self.inner.execute_request(&request).await
    }
}

async fn start() -> (Queue, RunningEndpoint, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("vmbackup-sb-{}", uuid::Uuid::new_v4()));
    let queue = Queue::open(&dir, Clock::real()).unwrap();
    queue.create_queue(QUEUE, &QueueOptions::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = EndpointConfig {
        sas_keys: HashMap::from([(KEY_NAME.to_string(), KEY.to_string())]),
        bearer_check: None,
        public_base_url: "https://local.servicebus.windows.net".to_string(),
    };
    let endpoint = servicebus_endpoint::spawn(queue.clone(), config, listener).unwrap();
    (queue, endpoint, dir)
}

fn client(addr: SocketAddr, key: &str) -> QueueClient {
    let http: Arc<dyn HttpClient> = Arc::new(LoopbackClient {
        inner: azure_core_legacy::new_http_client(),
        addr,
    });
    QueueClient::new(http, "local", QUEUE, KEY_NAME, key.to_string()).unwrap()
}

#[tokio::test]
async fn real_crate_sends_normal_and_scheduled_messages_with_sas() {
    let (queue, endpoint, dir) = start().await;
    let sender = client(endpoint.addr, KEY);

    sender
        .send_message(
            r#"{"ticket":"INC-1001"}"#,
            Some(SendMessageOptions {
                content_type: Some("application/json".into()),
                broker_properties: Some(SettableBrokerProperties {
                    message_id: Some("restore-INC-1001".into()),
                    correlation_id: Some("corr-1".into()),
                    label: Some("vmbackup.restore.requested".into()),
                    ..Default::default()
                }),
                custom_properties: Some(HashMap::from([(
                    "ticketid".to_string(),
                    "INC-1001".to_string(),
                )])),
            }),
        )
        .await
        .unwrap();

    // A delayed follow-up, as job polling sends it: RFC 2822 ScheduledEnqueueTimeUtc.
    let at = Utc::now() + chrono::Duration::seconds(2);
    let at_offset = azure_core_legacy::date::parse_rfc3339(&at.to_rfc3339()).unwrap();
    sender
        .send_message(
            r#"{"poll":1}"#,
            Some(SendMessageOptions {
                broker_properties: Some(SettableBrokerProperties {
                    message_id: Some("poll-1".into()),
                    scheduled_enqueue_time_utc: Some(at_offset),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    // Duplicate detection on MessageId: the resend is accepted and dropped.
    sender
        .send_message(
            r#"{"ticket":"INC-1001"}"#,
            Some(SendMessageOptions {
                broker_properties: Some(SettableBrokerProperties {
                    message_id: Some("restore-INC-1001".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert_eq!(queue.active_count_in(QUEUE).unwrap(), 2);

    // Peek-lock through the crate: the normal message with its broker properties.
    let first = sender
        .peek_lock_message2(Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(first.status().to_string(), "201");
    assert_eq!(first.body(), r#"{"ticket":"INC-1001"}"#);
    let broker = first.broker_properties().unwrap();
    assert_eq!(broker.message_id, "restore-INC-1001");
    assert_eq!(broker.delivery_count, 1);

    // Unlock (abandon) and receive again: DeliveryCount goes up.
    first.unlock_message().await.unwrap();
    let again = sender
        .peek_lock_message2(Some(Duration::from_secs(5)))
        .await
        .unwrap();
    let broker = again.broker_properties().unwrap();
    assert_eq!(broker.message_id, "restore-INC-1001");
    assert_eq!(broker.delivery_count, 2);
    again.renew_message_lock().await.unwrap();
    again.delete_message().await.unwrap();

    // The scheduled message is not there yet...
    let early = sender
        .peek_lock_message2(Some(Duration::from_secs(0)))
        .await
        .unwrap();
    assert_eq!(early.status().to_string(), "204");
    assert_eq!(queue.active_count_in(QUEUE).unwrap(), 1);
    // ...and arrives at its time, with the scheduled time kept.
    let later = sender
        .peek_lock_message2(Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(later.status().to_string(), "201");
    assert_eq!(later.body(), r#"{"poll":1}"#);
    // RFC 2822 carries whole seconds: never delivered before the scheduled second.
    assert!(Utc::now().timestamp() >= at.timestamp());
    later.delete_message().await.unwrap();
    assert_eq!(queue.active_count_in(QUEUE).unwrap(), 0);

    endpoint.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn properties_sent_by_the_crate_reach_the_queue() {
    let (queue, endpoint, dir) = start().await;
    let sender = client(endpoint.addr, KEY);
    let at = Utc::now() + chrono::Duration::hours(1);
    sender
        .send_message(
            "hello",
            Some(SendMessageOptions {
                content_type: Some("text/plain".into()),
                broker_properties: Some(SettableBrokerProperties {
                    message_id: Some("m-7".into()),
                    correlation_id: Some("corr-7".into()),
                    label: Some("subject-7".into()),
                    scheduled_enqueue_time_utc: Some(
                        azure_core_legacy::date::parse_rfc3339(&at.to_rfc3339()).unwrap(),
                    ),
                    ..Default::default()
                }),
                custom_properties: Some(HashMap::from([
                    ("ticketid".to_string(), "INC-7".to_string()),
                    ("attempt".to_string(), "3".to_string()),
                ])),
            }),
        )
        .await
        .unwrap();
    // Read the stored row by making it due: reopen with a clock one hour ahead.
    let ahead = Clock::scaled(Utc::now() + chrono::Duration::hours(2), 1.0);
    let later_view = Queue::open(&dir, ahead).unwrap();
    let got = later_view.receive(QUEUE).unwrap().unwrap();
    assert_eq!(got.message_id, "m-7");
    assert_eq!(got.body, b"hello");
    let p = &got.properties;
    assert_eq!(p.correlation_id.as_deref(), Some("corr-7"));
    assert_eq!(p.subject.as_deref(), Some("subject-7"));
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        p.scheduled_enqueue_time_utc.map(|t| t.timestamp()),
        Some(at.timestamp())
    );
    assert_eq!(p.application_properties["ticketid"], "INC-7");
    assert_eq!(p.application_properties["attempt"], 3);
    drop(queue);
    endpoint.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn wrong_key_and_bearer_are_checked() {
    let (queue, endpoint, dir) = start().await;
    let wrong = client(endpoint.addr, "not-the-key");
    let err = wrong.send_message("x", None).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(queue.active_count().unwrap(), 0);

    // Bearer tokens are refused without a check, accepted by one.
    let http = reqwest::Client::new();
    let url = format!("http://{}/{QUEUE}/messages", endpoint.addr);
    let refused = http
        .post(&url)
        .bearer_auth("token")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    endpoint.stop().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = EndpointConfig {
        sas_keys: HashMap::new(),
        bearer_check: Some(Arc::new(|token: &str| token == "issued-by-simulator")),
        public_base_url: "https://local.servicebus.windows.net".into(),
    };
    let endpoint = servicebus_endpoint::spawn(queue.clone(), config, listener).unwrap();
    let url = format!("http://{}/{QUEUE}/messages", endpoint.addr);
    let accepted = http
        .post(&url)
        .bearer_auth("issued-by-simulator")
        .header("BrokerProperties", r#"{"MessageId":"b-1"}"#)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 201);
    let rejected = http
        .post(&url)
        .bearer_auth("forged")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 401);
    let missing_queue = http
        .post(format!("http://{}/nope/messages", endpoint.addr))
        .bearer_auth("issued-by-simulator")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(missing_queue.status(), 404);
    assert_eq!(queue.active_count().unwrap(), 1);
    endpoint.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}
