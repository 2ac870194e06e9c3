//! The custom-handler runtime over real HTTP on loopback, with test-only functions.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;
use vmbackup::runtime::{
    FunctionApp, FunctionSpec, HandlerError, HttpRequest, Invocation, OutputBinding, Outputs,
    TimerInfo, Trigger,
};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    #[serde(rename = "orderId")]
    order_id: u32,
}
vmbackup::message_payload!(Order);

fn test_app() -> FunctionApp {
    FunctionApp::new()
        .function(
            FunctionSpec::new("echo", Trigger::service_bus("orders"))
                .output(OutputBinding::service_bus("out", "shipped")),
            |inv: Invocation<Order>| async move {
                let metadata = inv.metadata.service_bus().cloned().unwrap_or_default();
                let mut outputs = Outputs::new();
                outputs.push(
                    "out",
                    &json!({
                        "orderId": inv.data.order_id,
                        "deliveryCount": metadata.delivery_count,
                        "messageId": metadata.message_id,
                        "function": inv.context.function_name,
                    }),
                )?;
                Ok(outputs)
            },
        )
        .function(
            FunctionSpec::new("split", Trigger::service_bus("batches"))
                .output(OutputBinding::service_bus("out", "items")),
            |inv: Invocation<Order>| async move {
                let mut outputs = Outputs::new();
                for n in 0..inv.data.order_id {
                    outputs.push("out", &json!({ "item": n }))?;
                }
                Ok(outputs)
            },
        )
        .function(
            FunctionSpec::new("tick", Trigger::timer("0 */5 * * * *"))
                .output(OutputBinding::service_bus("out", "ticks")),
            |inv: Invocation<TimerInfo>| async move {
                let mut outputs = Outputs::new();
                outputs.push(
                    "out",
                    &json!({
                        "hasStatus": inv.data.schedule_status.is_some(),
                        "next": inv.data.schedule_status.and_then(|s| s.next),
                        "pastDue": inv.data.is_past_due,
                    }),
                )?;
                Ok(outputs)
            },
        )
        .function(
            FunctionSpec::new(
                "hook",
                Trigger::http(vmbackup::runtime::AuthLevel::Function, &["post"]),
            )
            .output(OutputBinding::http()),
            |inv: Invocation<HttpRequest>| async move {
                let mut outputs = Outputs::new();
                let body: Value = serde_json::from_str(inv.data.body.as_deref().unwrap_or("null"))
                    .map_err(|e| HandlerError::bad_input(format!("body: {e}")))?;
                outputs.http_response("res", 202, json!({ "received": body }));
                Ok(outputs)
            },
        )
        .function(
            FunctionSpec::new("logs", Trigger::service_bus("logs")),
            |inv: Invocation<Order>| async move {
                let id = inv.data.order_id;
                tracing::info!(order = id, "start {id}");
                // Yield so concurrent invocations interleave on the runtime's threads.
                for step in 0..3 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    tracing::info!("order {id} step {step}");
                }
                Ok(Outputs::new())
            },
        )
        .function(
            FunctionSpec::new("fails", Trigger::service_bus("fails")),
            |_inv: Invocation<Order>| async move {
                Err::<Outputs, _>(HandlerError::transient("Azure answered 503"))
            },
        )
        .function(
            FunctionSpec::new("panics", Trigger::service_bus("panics")),
            |inv: Invocation<Order>| async move {
                if inv.data.order_id > 0 {
                    panic!("test panic");
                }
                Ok(Outputs::new())
            },
        )
        .function(
            FunctionSpec::new("slow", Trigger::service_bus("slow"))
                .output(OutputBinding::service_bus("out", "done")),
            |inv: Invocation<Order>| async move {
                tokio::time::sleep(Duration::from_millis(u64::from(inv.data.order_id))).await;
                let mut outputs = Outputs::new();
                outputs.push("out", &json!({ "slept": inv.data.order_id }))?;
                Ok(outputs)
            },
        )
}

struct Server {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), vmbackup::runtime::ServeError>>,
}

/// Capture only: the product's stdout JSON layer would bypass the test harness's output capture.
fn init_capture() {
    use tracing_subscriber::prelude::*;
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(vmbackup::runtime::InvocationLogLayer)
        .try_init();
}

async fn start() -> Server {
    init_capture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(vmbackup::runtime::serve_with_shutdown(
        listener,
        test_app(),
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        base,
        stop: Some(stop),
        task,
    }
}

fn service_bus_envelope(body: Value) -> Value {
    json!({
        "Data": { "message": body },
        "Metadata": {
            "DeliveryCount": "2", "MessageId": "\"m-1\"", "EnqueuedTimeUtc": "11/28/2026 10:56:08 AM",
            "ApplicationProperties": {}, "sys": { "MethodName": "echo", "UtcNow": "2026-11-28T10:56:09Z", "RandGuid": "r" }
        }
    })
}

async fn post(base: &str, function: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/{function}"))
        .header("X-Azure-Functions-InvocationId", "inv-1")
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn readiness_probe_answers_200() {
    let server = start().await;
    let status = reqwest::get(format!("{}/", server.base))
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200);
}

#[tokio::test]
async fn service_bus_body_plain_single_and_double_encoded() {
    let server = start().await;
    let plain = json!({ "orderId": 7 });
    let single = Value::String(plain.to_string());
    // What the real host sends: the JSON text, JSON-encoded again inside the string.
    let double = Value::String(serde_json::to_string(&plain.to_string()).unwrap());
    for body in [plain, single, double] {
        let (status, response) = post(&server.base, "echo", &service_bus_envelope(body)).await;
        assert_eq!(status, 200, "{response}");
        let out = &response["Outputs"]["out"][0];
        assert_eq!(out["orderId"], 7);
        assert_eq!(out["deliveryCount"], 2);
        assert_eq!(out["messageId"], "m-1");
        assert_eq!(out["function"], "echo");
    }
}

#[tokio::test]
async fn timer_payload_with_and_without_schedule_status() {
    let server = start().await;
    let with_status = json!({ "Data": { "timer": {
        "Schedule": { "AdjustForDST": true },
        "ScheduleStatus": { "Last": "2026-11-28T10:00:00+00:00", "Next": "2026-11-28T10:05:00+00:00", "LastUpdated": "2026-11-28T10:00:00+00:00" },
        "IsPastDue": false } }, "Metadata": { "sys": {} } });
    let (status, response) = post(&server.base, "tick", &with_status).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["Outputs"]["out"][0]["hasStatus"], true);
    assert_eq!(
        response["Outputs"]["out"][0]["next"],
        "2026-11-28T10:05:00Z"
    );

    let without_status = json!({ "Data": { "timer": {
        "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": true } }, "Metadata": {} });
    let (status, response) = post(&server.base, "tick", &without_status).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["Outputs"]["out"][0]["hasStatus"], false);
    assert_eq!(response["Outputs"]["out"][0]["pastDue"], true);
}

#[tokio::test]
async fn outputs_with_one_and_with_several_messages() {
    let server = start().await;
    let (_, one) = post(
        &server.base,
        "split",
        &service_bus_envelope(json!({ "orderId": 1 })),
    )
    .await;
    assert_eq!(one["Outputs"]["out"].as_array().map(Vec::len), Some(1));
    let (_, several) = post(
        &server.base,
        "split",
        &service_bus_envelope(json!({ "orderId": 5 })),
    )
    .await;
    let items = several["Outputs"]["out"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(items.len(), 5);
    // Every message is a JSON object: the host would try to base64-decode strings.
    assert!(items.iter().all(Value::is_object));
}

#[tokio::test]
async fn http_trigger_in_json_mode_answers_through_the_http_output() {
    let server = start().await;
    let request = json!({ "Data": { "req": {
        "Url": "http://localhost:7071/api/hook", "Method": "POST", "Query": {},
        "Headers": { "Content-Type": ["application/json"] }, "Params": {},
        "Body": "{\"ticket\":\"INC-1\"}" } }, "Metadata": {} });
    let (status, response) = post(&server.base, "hook", &request).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["Outputs"]["res"]["statusCode"], "202");
    assert_eq!(
        response["Outputs"]["res"]["body"]["received"]["ticket"],
        "INC-1"
    );
}

#[tokio::test]
async fn logs_are_captured_per_invocation_under_50_concurrent_invocations() {
    let server = start().await;
    let calls = (0..50u32).map(|id| {
        let base = server.base.clone();
        async move {
            let (status, response) = post(
                &base,
                "logs",
                &service_bus_envelope(json!({ "orderId": id })),
            )
            .await;
            (id, status, response)
        }
    });
    let results = futures::future::join_all(calls).await;
    for (id, status, response) in results {
        assert_eq!(status, 200);
        let logs: Vec<String> = serde_json::from_value(response["Logs"].clone()).unwrap();
        assert_eq!(logs.len(), 4, "invocation {id}: {logs:?}");
        assert!(logs[0].contains(&format!("start {id}")), "{logs:?}");
        for (step, line) in logs[1..].iter().enumerate() {
            assert!(line.ends_with(&format!("order {id} step {step}")), "{line}");
        }
    }
}

#[tokio::test]
async fn errors_400_404_and_500_name_what_went_wrong() {
    let server = start().await;
    // Not JSON at all.
    let response = reqwest::Client::new()
        .post(format!("{}/echo", server.base))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    // The trigger binding is missing.
    let (status, body) = post(&server.base, "echo", &json!({ "Data": {}, "Metadata": {} })).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("Data.message"))
    );
    // The payload lacks a field.
    let (status, body) = post(
        &server.base,
        "echo",
        &service_bus_envelope(json!({ "id": 1 })),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap_or("").contains("orderId"),
        "{body}"
    );
    // Metadata number that is not a number.
    let mut bad_metadata = service_bus_envelope(json!({ "orderId": 1 }));
    bad_metadata["Metadata"]["DeliveryCount"] = json!("often");
    let (status, body) = post(&server.base, "echo", &bad_metadata).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("Metadata.DeliveryCount"))
    );
    // Unknown function.
    let (status, body) = post(&server.base, "nope", &service_bus_envelope(json!({}))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("UnknownFunction"))
    );
    // A transient handler error.
    let (status, body) = post(
        &server.base,
        "fails",
        &service_bus_envelope(json!({ "orderId": 1 })),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("HandlerFailed"))
    );
}

#[tokio::test]
async fn a_panic_answers_500_and_the_server_keeps_serving() {
    let server = start().await;
    let (status, body) = post(
        &server.base,
        "panics",
        &service_bus_envelope(json!({ "orderId": 1 })),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("HandlerPanicked"))
    );
    let (status, _) = post(
        &server.base,
        "panics",
        &service_bus_envelope(json!({ "orderId": 0 })),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn shutdown_lets_an_invocation_in_flight_finish() {
    let mut server = start().await;
    let base = server.base.clone();
    let in_flight = tokio::spawn(async move {
        post(
            &base,
            "slow",
            &service_bus_envelope(json!({ "orderId": 300 })),
        )
        .await
    });
    // Let the request reach the handler, then ask the server to stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.take().unwrap().send(()).unwrap();
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["Outputs"]["out"][0]["slept"], 300);
    server.task.await.unwrap().unwrap();
    // The listener is closed once the server has stopped.
    assert!(reqwest::get(format!("{}/", server.base)).await.is_err());
}

#[test]
fn serve_stops_on_sigterm_and_rejects_a_bad_port() {
    use std::process::{Command, Stdio};
    let binary = env!("CARGO_BIN_EXE_vmbackup");
    let bad = Command::new(binary)
        .arg("serve")
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", "not-a-port")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("FUNCTIONS_CUSTOMHANDLER_PORT"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(binary)
        .arg("serve")
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(ready, "serve never listened");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    // Logs are JSON lines on stdout.
    let lines: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or(Value::Null))
        .collect();
    assert!(
        lines.iter().all(Value::is_object),
        "every stdout line is JSON: {stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "custom handler listening"),
        "{stdout}"
    );
}
