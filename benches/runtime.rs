//! Runtime benchmark (not a test), `cargo bench --bench runtime`:
//!
//! 1. cold start: `vmbackup serve` and a minimal Node.js server (`scripts/bench-node-server.js`)
//!    started the same way, alternately, each timed from spawn to the first `200` on `GET /`;
//! 2. memory: `vmbackup serve` configured against an in-process Azure simulator — idle RSS, then
//!    peak RSS (VmHWM) while 256 concurrent callers invoke the real `assess-vm` function (each
//!    invocation reads the VM, its protection and the vaults from the simulator over HTTP);
//! 3. runtime overhead: a trivial in-process handler whose own time is measured inside it, one caller
//!    at a time (round trip − handler time) and at 64 concurrent (invocations/s, p50/p99).
//!
//! Targets (issues 2 and 10): cold start ≤ 20 ms and ≤ half of Node's, idle RSS ≤ 15 MiB, peak RSS
//! ≤ 64 MiB, ≥ 10,000 invocations/s on 2 cores. The load generator and the simulator share the
//! machine (and its cores) with the server. Each result is also printed as a `BENCH key=value` line
//! for `scripts/bench`. `VMBACKUP_BENCH_STARTS` (default 30) sets the cold starts per server,
//! `VMBACKUP_BENCH_LOAD_SECONDS` (default 6) the length of the 256-caller load.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbackup::events::{CloudEvent, ProtectionCause, ProtectionRequested};
use vmbackup::runtime::{FunctionApp, FunctionSpec, Invocation, OutputBinding, Outputs, Trigger};
use vmbackup::simulator::{fleet::Fleet, Simulator, SimulatorConfig};

const SUBSCRIPTION: &str = "11111111-1111-1111-1111-111111111111";
const LOAD_CALLERS: usize = 256;
const LOAD_VMS: usize = 256;
const OVERHEAD_SEQUENTIAL_CALLS: usize = 5_000;
const INVOCATIONS: usize = 40_000;
const CONCURRENCY: usize = 64;

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn http_get_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// Spawn a server on `port` and wait for its first `200` on `GET /`, polling every 200 µs (the
/// Functions host polls far less often). `None` when it does not answer within 10 s.
fn start_and_wait(command: &mut Command, port: u16) -> Option<(Child, Duration)> {
    let started = Instant::now();
    let mut child = command
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    while !http_get_ok(port) {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Some((child, started.elapsed()))
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn node_server_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-node-server.js")
}

struct Spread {
    median: Duration,
    min: Duration,
    max: Duration,
    count: usize,
}

fn spread(mut times: Vec<Duration>) -> Option<Spread> {
    times.sort();
    Some(Spread {
        median: percentile(&times, 0.5),
        min: *times.first()?,
        max: *times.last()?,
        count: times.len(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Alternate `vmbackup serve` and the Node server, `runs` starts each; Node is skipped (None) when
/// `node` cannot be started.
fn cold_starts(runs: usize) -> (Vec<Duration>, Option<Vec<Duration>>, Option<u64>) {
    let binary = env!("CARGO_BIN_EXE_vmbackup");
    let script = node_server_script();
    let mut ours = Vec::new();
    let mut node: Option<Vec<Duration>> = Some(Vec::new());
    let mut node_idle_rss = None;
    for run in 0..runs {
        // Alternate which one goes first, so neither always follows the other's exit.
        let order = if run % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_ours in order {
            if is_ours {
                let mut command = Command::new(binary);
                command.arg("serve");
                match start_and_wait(&mut command, free_port()) {
                    Some((child, elapsed)) => {
                        ours.push(elapsed);
                        stop(child);
                    }
                    None => eprintln!("vmbackup serve did not answer within 10 s"),
                }
            } else if let Some(times) = node.as_mut() {
                let mut command = Command::new("node");
                command.arg(&script);
                match start_and_wait(&mut command, free_port()) {
                    Some((child, elapsed)) => {
                        times.push(elapsed);
                        if node_idle_rss.is_none() {
                            std::thread::sleep(Duration::from_secs(1));
                            node_idle_rss = status_kib(child.id(), "VmRSS");
                        }
                        stop(child);
                    }
                    None => {
                        eprintln!(
                            "node {} did not start; Node baseline skipped",
                            script.display()
                        );
                        node = None;
                    }
                }
            }
        }
    }
    (ours, node, node_idle_rss)
}

/// 256 tagged, unprotected PMK VMs and one vault: `assess-vm` reads each and answers
/// `protection.ready`.
fn load_fleet() -> Fleet {
    let vms: Vec<Value> = (0..LOAD_VMS)
        .map(|i| {
            json!({ "name": format!("vm-{i:03}"), "resourceGroup": "rg-app", "location": "westeurope",
                    "os": "linux", "tags": { "backup-policy": "DefaultPolicy" },
                    "encryption": { "kind": "pmk" }, "agent": "ready", "powerState": "running" })
        })
        .collect();
    let fleet = json!({ "subscriptions": [{ "id": SUBSCRIPTION,
        "recoveryVaults": [{ "name": "rsv-weu", "resourceGroup": "rg-backup", "location": "westeurope",
                             "policies": ["DefaultPolicy"] }],
        "virtualMachines": vms }] });
    match Fleet::from_json_str(&fleet.to_string()) {
        Ok(fleet) => fleet,
        Err(e) => fail(&format!("the load fleet is invalid: {e}")),
    }
}

/// The Service Bus trigger payload of one `protection.requested` for `vm`.
fn assess_payload(vm: usize) -> Vec<u8> {
    let vm_id = format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-app/providers/Microsoft.Compute/virtualMachines/vm-{vm:03}"
    );
    let event = CloudEvent::start(
        ProtectionRequested {
            vm_id: vmbackup::domain::ResourceId::parse(&vm_id)
                .unwrap_or_else(|e| fail(&format!("bad VM id {vm_id}: {e}"))),
            policy: Some("DefaultPolicy".into()),
            cause: ProtectionCause::Sweep,
            agent_checks: 0,
        },
        Some(vm_id.clone()),
        chrono::Utc::now(),
    );
    let message = serde_json::to_string(&event).unwrap_or_default();
    let body = json!({
        "Data": { "message": serde_json::to_string(&message).unwrap_or_default() },
        "Metadata": { "DeliveryCount": "1", "MessageId": format!("\"{}\"", event.id), "sys": {} }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

struct LoadResult {
    idle_rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    ok: u64,
    failed: u64,
    seconds: f64,
    ready_outputs: bool,
    arm_requests: u64,
    throttled: u64,
}

/// `vmbackup serve` against the simulator: idle RSS, then VmHWM under 256 concurrent `assess-vm`s.
async fn serve_under_load(load_seconds: u64) -> Result<LoadResult, Box<dyn std::error::Error>> {
    let sim = Simulator::start(SimulatorConfig::new(load_fleet())).await?;
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmbackup"));
    command
        .arg("serve")
        .env("VMBACKUP_ARM_ENDPOINT", sim.arm_endpoint())
        .env("IDENTITY_ENDPOINT", sim.identity_endpoint())
        .env("IDENTITY_HEADER", sim.identity_header())
        .env("VMBACKUP_CREDENTIAL", "managed-identity")
        .env("VMBACKUP_SUBSCRIPTIONS", SUBSCRIPTION)
        .env(
            "VMBACKUP_BACKUP_MANAGEMENT_SERVICE_OBJECT_ID",
            vmbackup::simulator::state::BACKUP_MANAGEMENT_SERVICE_OBJECT_ID,
        )
        .envs(sim.clock().to_env());
    let (child, _) = tokio::task::spawn_blocking(move || start_and_wait(&mut command, port))
        .await?
        .ok_or("vmbackup serve (workflow app against the simulator) did not start")?;
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = status_kib(pid, "VmRSS");

    let url = format!("http://127.0.0.1:{port}/assess-vm");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(LOAD_CALLERS)
        .build()?;
    // One invocation first, to check that the handler does the real work (a `protection.ready`).
    let first: Value = client
        .post(&url)
        .body(assess_payload(0))
        .send()
        .await?
        .json()
        .await?;
    let ready_outputs = !first["Outputs"]["protectionReady"].is_null();
    let before = sim.counters();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(load_seconds);
    let started = Instant::now();
    let callers = (0..LOAD_CALLERS).map(|caller| {
        let client = client.clone();
        let url = url.clone();
        let ok = ok.clone();
        let failed = failed.clone();
        tokio::spawn(async move {
            let body = assess_payload(caller % LOAD_VMS);
            while Instant::now() < deadline {
                let success = match client.post(&url).body(body.clone()).send().await {
                    Ok(response) => {
                        response.status().is_success() && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                let counter = if success { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    futures::future::join_all(callers).await;
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_kib = status_kib(pid, "VmHWM");
    let after = sim.counters();
    stop(child);
    sim.shutdown().await;
    Ok(LoadResult {
        idle_rss_kib,
        peak_rss_kib,
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        seconds,
        ready_outputs,
        arm_requests: after.requests - before.requests,
        throttled: after.throttled - before.throttled,
    })
}

/// Echo handler that adds the time spent inside it to `handler_nanos`.
fn timed_trivial_app(handler_nanos: Arc<AtomicU64>) -> FunctionApp {
    FunctionApp::new().function(
        FunctionSpec::new("echo", Trigger::service_bus("in"))
            .output(OutputBinding::service_bus("out", "out")),
        move |inv: Invocation<Value>| {
            let handler_nanos = handler_nanos.clone();
            async move {
                let started = Instant::now();
                let mut outputs = Outputs::new();
                outputs.push("out", &inv.data)?;
                handler_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                Ok(outputs)
            }
        },
    )
}

struct Overhead {
    sequential_round_trip: Duration,
    sequential_handler: Duration,
    per_second: f64,
    latencies: Vec<Duration>,
}

async fn post_ok(client: &reqwest::Client, url: &str, body: &[u8]) -> bool {
    match client.post(url).body(body.to_vec()).send().await {
        Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
        Err(_) => false,
    }
}

async fn overhead() -> Result<Overhead, Box<dyn std::error::Error>> {
    let handler_nanos = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/echo", listener.local_addr()?);
    tokio::spawn(vmbackup::runtime::serve_with_shutdown(
        listener,
        timed_trivial_app(handler_nanos.clone()),
        std::future::pending(),
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()?;
    let body = serde_json::to_vec(&json!({
        "Data": { "message": "\"{\\\"vm\\\":\\\"vm-web-01\\\"}\"" },
        "Metadata": { "DeliveryCount": "1", "MessageId": "\"m\"", "sys": {} }
    }))?;
    // Warm the connection pool.
    for _ in 0..CONCURRENCY {
        post_ok(&client, &url, &body).await;
    }

    // One caller at a time: what the runtime adds to each invocation, loopback HTTP included.
    handler_nanos.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let mut sequential_ok = 0u32;
    for _ in 0..OVERHEAD_SEQUENTIAL_CALLS {
        if post_ok(&client, &url, &body).await {
            sequential_ok += 1;
        }
    }
    let sequential_wall = started.elapsed();
    let calls = sequential_ok.max(1);
    let sequential_round_trip = sequential_wall / calls;
    let sequential_handler = Duration::from_nanos(handler_nanos.load(Ordering::Relaxed)) / calls;

    let started = Instant::now();
    let workers = (0..CONCURRENCY).map(|_| {
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(INVOCATIONS / CONCURRENCY);
            for _ in 0..INVOCATIONS / CONCURRENCY {
                let sent = Instant::now();
                if post_ok(&client, &url, &body).await {
                    latencies.push(sent.elapsed());
                }
            }
            latencies
        })
    });
    let mut latencies = Vec::with_capacity(INVOCATIONS);
    for worker in futures::future::join_all(workers).await {
        latencies.extend(worker?);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Overhead {
        sequential_round_trip,
        sequential_handler,
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies,
    })
}

fn fail(message: &str) -> ! {
    eprintln!("runtime bench: {message}");
    std::process::exit(1);
}

fn main() {
    let starts: usize = env_number("VMBACKUP_BENCH_STARTS", 30);
    let load_seconds: u64 = env_number("VMBACKUP_BENCH_LOAD_SECONDS", 6);
    let (ours, node, node_idle_rss) = cold_starts(starts);
    let runtime = tokio::runtime::Runtime::new()
        .unwrap_or_else(|e| fail(&format!("cannot start tokio: {e}")));
    let load = runtime
        .block_on(serve_under_load(load_seconds))
        .unwrap_or_else(|e| fail(&format!("load run failed: {e}")));
    let overhead = runtime
        .block_on(overhead())
        .unwrap_or_else(|e| fail(&format!("overhead run failed: {e}")));

    println!("| measure | value | target |");
    println!("|---|---|---|");
    let ours = spread(ours).unwrap_or_else(|| fail("vmbackup serve never answered"));
    println!(
        "| `vmbackup serve` spawn → first 200 on GET / (median of {}) | {:.1} ms (min {:.1}, max {:.1}) | ≤ 20 ms |",
        ours.count, ms(ours.median), ms(ours.min), ms(ours.max)
    );
    println!(
        "BENCH cold_start_runs={} cold_start_median_ms={:.2} cold_start_min_ms={:.2} cold_start_max_ms={:.2}",
        ours.count, ms(ours.median), ms(ours.min), ms(ours.max)
    );
    match node.and_then(spread) {
        Some(node) => {
            println!(
                "| Node.js `http.createServer`, same way, alternated (median of {}) | {:.1} ms (min {:.1}, max {:.1}) | ours ≤ half |",
                node.count, ms(node.median), ms(node.min), ms(node.max)
            );
            println!(
                "BENCH node_start_runs={} node_start_median_ms={:.2} node_start_min_ms={:.2} node_start_max_ms={:.2}",
                node.count, ms(node.median), ms(node.min), ms(node.max)
            );
        }
        None => println!("| Node.js baseline | not run (node unavailable) | |"),
    }
    if let Some(kib) = node_idle_rss {
        println!("BENCH node_idle_rss_mib={:.1}", mib(kib));
    }
    match (load.idle_rss_kib, load.peak_rss_kib) {
        (Some(idle), Some(peak)) => {
            println!(
                "| idle RSS, workflow app against the simulator | {:.1} MiB | ≤ 15 MiB |",
                mib(idle)
            );
            println!(
                "| peak RSS (VmHWM), {LOAD_CALLERS} concurrent `assess-vm` for {:.1} s | {:.1} MiB | ≤ 64 MiB |",
                load.seconds,
                mib(peak)
            );
            println!(
                "BENCH idle_rss_mib={:.1} peak_rss_mib={:.1}",
                mib(idle),
                mib(peak)
            );
        }
        _ => println!("| RSS | not measured (/proc unavailable) | |"),
    }
    println!(
        "| `assess-vm` under load: ok / failed, ARM requests, throttled | {} / {} ({:.0}/s), {} ARM, {} throttled; returns protection.ready: {} | |",
        load.ok,
        load.failed,
        load.ok as f64 / load.seconds,
        load.arm_requests,
        load.throttled,
        load.ready_outputs
    );
    println!(
        "BENCH load_callers={LOAD_CALLERS} load_seconds={:.1} load_ok={} load_failed={} load_per_second={:.0} load_arm_requests={} load_throttled={} load_ready_outputs={}",
        load.seconds,
        load.ok,
        load.failed,
        load.ok as f64 / load.seconds,
        load.arm_requests,
        load.throttled,
        load.ready_outputs
    );
    let overhead_us = overhead
        .sequential_round_trip
        .saturating_sub(overhead.sequential_handler)
        .as_secs_f64()
        * 1e6;
    println!(
        "| one caller: round trip − handler time ({OVERHEAD_SEQUENTIAL_CALLS} calls) | {overhead_us:.0} µs ({:.0} µs round trip, {:.1} µs in the handler) | |",
        overhead.sequential_round_trip.as_secs_f64() * 1e6,
        overhead.sequential_handler.as_secs_f64() * 1e6,
    );
    println!(
        "| invocations/s, trivial handler, {CONCURRENCY} concurrent, {} calls | {:.0} | ≥ 10,000 |",
        overhead.latencies.len(),
        overhead.per_second
    );
    println!(
        "| latency p50 / p99 | {:.2} ms / {:.2} ms | |",
        ms(percentile(&overhead.latencies, 0.5)),
        ms(percentile(&overhead.latencies, 0.99)),
    );
    println!(
        "BENCH overhead_us={overhead_us:.0} round_trip_us={:.0} handler_us={:.2} per_second={:.0} calls={} concurrency={CONCURRENCY} p50_ms={:.2} p99_ms={:.2}",
        overhead.sequential_round_trip.as_secs_f64() * 1e6,
        overhead.sequential_handler.as_secs_f64() * 1e6,
        overhead.per_second,
        overhead.latencies.len(),
        ms(percentile(&overhead.latencies, 0.5)),
        ms(percentile(&overhead.latencies, 0.99)),
    );
}
