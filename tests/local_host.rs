//! The local Functions host over real HTTP on loopback: an in-process test handler records what the
//! host sends, and a real child process (python3) checks spawning and restarting.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc, Weekday};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmbackup::clock::Clock;
use vmbackup::local::app::App;
use vmbackup::local::host::{HandlerTarget, Host, HostConfig, HostEvent, Outcome};
use vmbackup::local::queue::{OutgoingMessage, Queue, ReceivedMessage};

const HOST_JSON: &str = r#"{ "version": "2.0",
  "customHandler": { "description": { "defaultExecutablePath": "vmbackup", "arguments": ["serve"] } },
  "extensions": { "serviceBus": { "maxConcurrentCalls": 4 } } }"#;

fn temp_dir(kind: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmbackup-{kind}-{}", uuid::Uuid::new_v4()))
}

fn write_app(files: &[(&str, &str)]) -> PathBuf {
    let root = temp_dir("app");
    for (rel, text) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    root
}

#[derive(Clone, Debug)]
struct Recorded {
    path: String,
    headers: HeaderMap,
    body: Value,
}

type Responder = Arc<dyn Fn(&str, &Value) -> (u16, Value) + Send + Sync>;

#[derive(Clone)]
struct Recorder {
    calls: Arc<Mutex<Vec<Recorded>>>,
    respond: Responder,
}

impl Recorder {
    fn calls_to(&self, path: &str) -> Vec<Recorded> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }
}

async fn record(
    State(r): State<Recorder>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if body.is_empty() {
        // GET / readiness probe.
        return axum::http::StatusCode::OK.into_response();
    }
    let body: Value = serde_json::from_slice(&body).unwrap();
    let path = uri.path().to_string();
    let (status, answer) = (r.respond)(&path, &body);
    r.calls.lock().unwrap().push(Recorded {
        path,
        headers,
        body,
    });
    (
        axum::http::StatusCode::from_u16(status).unwrap(),
        axum::Json(answer),
    )
        .into_response()
}

/// A handler speaking the protocol, in process.
async fn start_handler(respond: Responder) -> (String, Recorder) {
    let recorder = Recorder {
        calls: Arc::default(),
        respond,
    };
    let router = axum::Router::new()
        .fallback(record)
        .with_state(recorder.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), recorder)
}

async fn start_host(
    root: &std::path::Path,
    clock: Clock,
    target: Option<HandlerTarget>,
    http: bool,
) -> (Host, Queue, PathBuf) {
    let app = App::load(root, &HashMap::new()).unwrap();
    let state = temp_dir("state");
    let queue = Queue::open(&state, clock).unwrap();
    let mut config = HostConfig::new(app, queue.clone());
    if let Some(target) = target {
        config.target = target;
    }
    if http {
        config.http_listen = Some("127.0.0.1:0".parse().unwrap());
        config.function_keys = vec!["k1".into()];
    }
    let host = Host::start(config).await.unwrap();
    (host, queue, state)
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

fn drain(queue: &Queue, name: &str) -> Vec<ReceivedMessage> {
    let mut all = Vec::new();
    while let Some(m) = queue.receive(name).unwrap() {
        queue.complete(name, &m.lock_token).unwrap();
        all.push(m);
    }
    all
}

#[tokio::test]
async fn service_bus_payload_is_exact_and_array_output_sends_several_messages() {
    let root = write_app(&[
        ("host.json", HOST_JSON),
        (
            "SbWork/function.json",
            r#"{ "bindings": [
              { "type": "serviceBusTrigger", "direction": "in", "name": "msg", "queueName": "work", "connection": "SB" },
              { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "results", "connection": "SB" } ] }"#,
        ),
    ]);
    let (base, recorder) = start_handler(Arc::new(|_, _| {
        (200, json!({ "Outputs": { "out": [ {"n": 1}, {"n": 2}, {"n": 3} ] }, "Logs": ["done"], "ReturnValue": null }))
    }))
    .await;
    let (host, queue, state) =
        start_host(&root, Clock::real(), Some(HandlerTarget::Url(base)), false).await;
    let mut events = host.subscribe();

    let mut message = OutgoingMessage::new(r#"{"orderId":7}"#);
    message.properties.message_id = Some("m-1".into());
    message.properties.correlation_id = Some("c-1".into());
    message.properties.subject = Some("vmbackup.test".into());
    message
        .properties
        .application_properties
        .insert("tenant".into(), json!("a"));
    queue.send("work", &message).unwrap();

    wait_until("three outputs are enqueued", || {
        queue.active_count_in("results").unwrap() == 3
            && queue.active_count_in("work").unwrap() == 0
    })
    .await;

    let calls = recorder.calls_to("/SbWork");
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert!(!call.headers["x-azure-functions-invocationid"].is_empty());
    assert!(call.headers["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("Azure-Functions-Host/"));
    let body = &call.body;
    // The body is double-encoded: a JSON string holding the JSON text as a quoted string.
    assert_eq!(body["Data"]["msg"], json!(r#""{\"orderId\":7}""#));
    let inner: String = serde_json::from_str(body["Data"]["msg"].as_str().unwrap()).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&inner).unwrap(),
        json!({"orderId": 7})
    );
    let metadata = &body["Metadata"];
    assert_eq!(
        metadata["DeliveryCount"],
        json!("1"),
        "numbers arrive as strings"
    );
    assert_eq!(metadata["MessageId"], json!("\"m-1\""));
    assert_eq!(metadata["CorrelationId"], json!("\"c-1\""));
    assert_eq!(metadata["Label"], json!("\"vmbackup.test\""));
    assert!(metadata["SequenceNumber"]
        .as_str()
        .unwrap()
        .parse::<i64>()
        .is_ok());
    assert_eq!(metadata["ApplicationProperties"], json!({"tenant": "a"}));
    assert_eq!(metadata["sys"]["MethodName"], json!("SbWork"));
    assert!(metadata["sys"]["RandGuid"].is_string());
    DateTime::parse_from_rfc3339(metadata["sys"]["UtcNow"].as_str().unwrap()).unwrap();

    let results: Vec<Value> = drain(&queue, "results")
        .iter()
        .map(|m| serde_json::from_slice(&m.body).unwrap())
        .collect();
    assert_eq!(
        results,
        vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]
    );

    let mut finished = None;
    wait_until("the invocation is reported finished", || {
        while let Ok(event) = events.try_recv() {
            if let HostEvent::InvocationFinished {
                outcome,
                messages_out,
                message_id,
                ..
            } = event
            {
                finished = Some((outcome, messages_out, message_id));
            }
        }
        finished.is_some()
    })
    .await;
    assert_eq!(
        finished,
        Some((Outcome::Succeeded, 3, Some("m-1".to_string())))
    );
    wait_until("the host is idle", || host.is_idle().unwrap()).await;
    host.stop().await;
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(state);
}

#[tokio::test]
async fn failing_invocations_are_retried_then_dead_lettered_and_the_rest_completes() {
    let root = write_app(&[
        ("host.json", HOST_JSON),
        (
            "Flaky/function.json",
            r#"{ "bindings": [ { "type": "serviceBusTrigger", "direction": "in", "name": "msg", "queueName": "flaky" } ] }"#,
        ),
        (
            "Good/function.json",
            r#"{ "bindings": [ { "type": "serviceBusTrigger", "direction": "in", "name": "msg", "queueName": "good" } ] }"#,
        ),
    ]);
    let (base, recorder) = start_handler(Arc::new(|path, _| {
        if path == "/Flaky" {
            (500, json!({"error": "boom"}))
        } else {
            (200, json!({}))
        }
    }))
    .await;
    let (host, queue, state) =
        start_host(&root, Clock::real(), Some(HandlerTarget::Url(base)), false).await;
    let mut events = host.subscribe();
    let mut poison = OutgoingMessage::new("not json at all");
    poison.properties.message_id = Some("poison-1".into());
    queue.send("flaky", &poison).unwrap();
    queue.send("good", &OutgoingMessage::new("{}")).unwrap();

    wait_until("the poison message is dead-lettered", || {
        queue.dead_letter_count().unwrap() == 1
    })
    .await;
    wait_until("the good message is done", || {
        queue.active_count_in("good").unwrap() == 0
    })
    .await;
    let counts: Vec<Value> = recorder
        .calls_to("/Flaky")
        .iter()
        .map(|c| c.body["Metadata"]["DeliveryCount"].clone())
        .collect();
    let expected: Vec<Value> = (1..=10).map(|n| json!(n.to_string())).collect();
    assert_eq!(counts, expected);
    let dead = queue.dead_letters("flaky").unwrap();
    assert_eq!(dead[0].reason, "MaxDeliveryCountExceeded");
    assert_eq!(dead[0].message_id, "poison-1");
    wait_until("the dead-letter event is seen", || {
        while let Ok(event) = events.try_recv() {
            if matches!(event, HostEvent::DeadLettered { ref message_id, .. } if message_id == "poison-1") {
                return true;
            }
        }
        false
    })
    .await;
    wait_until("the host is idle", || host.is_idle().unwrap()).await;
    host.stop().await;
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(state);
}

#[tokio::test]
async fn timers_fire_on_startup_and_on_the_simulated_clock() {
    let root = write_app(&[
        ("host.json", HOST_JSON),
        (
            "Sweep/function.json",
            r#"{ "bindings": [
              { "type": "timerTrigger", "direction": "in", "name": "timer", "schedule": "0 30 9 * * 1-5", "runOnStartup": true },
              { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "swept" } ] }"#,
        ),
        (
            "Tick/function.json",
            r#"{ "bindings": [ { "type": "timerTrigger", "direction": "in", "name": "timer", "schedule": "*/10 * * * * *" } ] }"#,
        ),
    ]);
    let (base, recorder) = start_handler(Arc::new(|_, _| {
        (200, json!({ "Outputs": { "out": { "swept": true } } }))
    }))
    .await;
    // From a Saturday midnight, 100 times faster than the wall clock: a tick every 100 ms, and the
    // weekday 09:30 schedule is days of simulated time away.
    let saturday = Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0).unwrap();
    let clock = Clock::scaled(saturday, 0.01);
    let (host, queue, state) =
        start_host(&root, clock, Some(HandlerTarget::Url(base)), false).await;

    wait_until("Tick fires twice", || recorder.calls_to("/Tick").len() >= 2).await;
    let sweeps = recorder.calls_to("/Sweep");
    assert_eq!(
        sweeps.len(),
        1,
        "runOnStartup fires once; 09:30 on a weekday is far away"
    );
    let body = &sweeps[0].body;
    let timer = &body["Data"]["timer"];
    assert_eq!(timer["Schedule"], json!({"AdjustForDST": true}));
    assert_eq!(timer["IsPastDue"], json!(false));
    let next =
        DateTime::parse_from_rfc3339(timer["ScheduleStatus"]["Next"].as_str().unwrap()).unwrap();
    assert_eq!(next.weekday(), Weekday::Mon);
    assert_eq!((next.day(), next.hour(), next.minute()), (30, 9, 30));
    assert!(timer["ScheduleStatus"]["Last"].is_string());
    let metadata_keys: Vec<&String> = body["Metadata"].as_object().unwrap().keys().collect();
    assert_eq!(metadata_keys, vec!["sys"]);
    assert_eq!(queue.active_count_in("swept").unwrap(), 1);
    // Tick's scheduled instants are on 10-second boundaries of simulated time.
    let tick = &recorder.calls_to("/Tick")[1].body["Data"]["timer"]["ScheduleStatus"];
    let next = DateTime::parse_from_rfc3339(tick["Next"].as_str().unwrap()).unwrap();
    assert_eq!(next.second() % 10, 0);
    host.stop().await;
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(state);
}

#[tokio::test]
async fn http_front_door_checks_keys_and_returns_the_http_output() {
    let root = write_app(&[
        ("host.json", HOST_JSON),
        (
            "restore-webhook/function.json",
            r#"{ "bindings": [
              { "type": "httpTrigger", "direction": "in", "name": "req", "authLevel": "function", "methods": ["post"], "route": "restore/{ticket}" },
              { "type": "http", "direction": "out", "name": "res" },
              { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "restore-requests" } ] }"#,
        ),
    ]);
    let (base, recorder) = start_handler(Arc::new(|_, _| {
        (200, json!({ "Outputs": {
            "res": { "statusCode": "202", "body": { "accepted": true }, "headers": { "X-Ticket": "INC-9" } },
            "out": { "ticket": "INC-9" } } }))
    }))
    .await;
    let (host, queue, state) =
        start_host(&root, Clock::real(), Some(HandlerTarget::Url(base)), true).await;
    let addr = host.http_addr().unwrap();
    let http = reqwest::Client::new();

    let denied = http
        .post(format!("http://{addr}/api/restore/INC-9"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let wrong_method = http
        .get(format!("http://{addr}/api/restore/INC-9?code=k1"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 404);

    let answer = http
        .post(format!(
            "http://{addr}/api/restore/INC-9?code=k1&mode=disks"
        ))
        .header("content-type", "application/json")
        .body(r#"{"x":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    assert_eq!(answer.headers()["x-ticket"], "INC-9");
    assert_eq!(
        answer.json::<Value>().await.unwrap(),
        json!({"accepted": true})
    );

    let calls = recorder.calls_to("/restore-webhook");
    assert_eq!(calls.len(), 1);
    let req = &calls[0].body["Data"]["req"];
    assert_eq!(req["Method"], "POST");
    assert_eq!(req["Params"], json!({"ticket": "INC-9"}));
    assert_eq!(req["Query"]["mode"], "disks");
    assert_eq!(req["Body"], r#"{"x":1}"#);
    assert_eq!(req["Headers"]["content-type"], json!(["application/json"]));
    assert!(req["Url"]
        .as_str()
        .unwrap()
        .ends_with("/api/restore/INC-9?code=k1&mode=disks"));
    let sent = drain(&queue, "restore-requests");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        serde_json::from_slice::<Value>(&sent[0].body).unwrap(),
        json!({"ticket": "INC-9"})
    );
    host.stop().await;
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(state);
}

const PYTHON_HANDLER: &str = r#"
import http.server, json, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def do_POST(self):
        length = int(self.headers.get('Content-Length', 0))
        json.loads(self.rfile.read(length))
        answer = json.dumps({"Outputs": {"out": {"pid": os.getpid(),
            "setting": os.environ.get("MY_SETTING"),
            "scale": os.environ.get("VMBACKUP_TIME_SCALE"),
            "path": self.path}}, "Logs": ["handled"]}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
port = int(os.environ['FUNCTIONS_CUSTOMHANDLER_PORT'])
http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler).serve_forever()
"#;

fn process_alive(pid: u64) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn spawns_the_handler_from_host_json_and_restarts_it_when_it_dies() {
    let python_ok = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !python_ok {
        println!("SKIPPED: python3 is not available to act as a child handler process");
        return;
    }
    let root = write_app(&[
        (
            "host.json",
            r#"{ "version": "2.0", "customHandler": { "description": {
                "defaultExecutablePath": "python3", "arguments": ["handler.py"] } } }"#,
        ),
        ("handler.py", PYTHON_HANDLER),
        (
            "Echo/function.json",
            r#"{ "bindings": [
              { "type": "serviceBusTrigger", "direction": "in", "name": "msg", "queueName": "echo-in" },
              { "type": "serviceBus", "direction": "out", "name": "out", "queueName": "echo-out" } ] }"#,
        ),
    ]);
    let app = App::load(&root, &HashMap::new()).unwrap();
    let state = temp_dir("state");
    let queue = Queue::open(&state, Clock::scaled(Utc::now(), 0.5)).unwrap();
    let mut config = HostConfig::new(app, queue.clone());
    config.app_settings = HashMap::from([("MY_SETTING".to_string(), "hello".to_string())]);
    assert!(matches!(config.target, HandlerTarget::Command { .. }));
    let host = Host::start(config).await.unwrap();
    let mut events = host.subscribe();

    queue.send("echo-in", &OutgoingMessage::new("{}")).unwrap();
    wait_until("the child answers", || {
        queue.active_count_in("echo-out").unwrap() == 1
    })
    .await;
    let first: Value = serde_json::from_slice(&drain(&queue, "echo-out")[0].body).unwrap();
    assert_eq!(first["setting"], "hello", "app settings reach the child");
    assert_eq!(first["scale"], "0.5", "the clock reaches the child");
    assert_eq!(first["path"], "/Echo");
    let first_pid = first["pid"].as_u64().unwrap();

    let killed = std::process::Command::new("kill")
        .args(["-9", &first_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_until("the host sees the exit", || {
        while let Ok(event) = events.try_recv() {
            if matches!(event, HostEvent::HandlerExited { .. }) {
                return true;
            }
        }
        false
    })
    .await;

    queue.send("echo-in", &OutgoingMessage::new("{}")).unwrap();
    wait_until("the restarted child answers", || {
        queue.active_count_in("echo-out").unwrap() == 1
    })
    .await;
    let second: Value = serde_json::from_slice(&drain(&queue, "echo-out")[0].body).unwrap();
    let second_pid = second["pid"].as_u64().unwrap();
    assert_ne!(first_pid, second_pid);
    assert!(process_alive(second_pid));

    host.stop().await;
    wait_until("the child is stopped with the host", || {
        !process_alive(second_pid)
    })
    .await;
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(state);
}
