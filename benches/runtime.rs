//! Runtime benchmark (not a test): start-up to first `200`, invocation throughput and latency for a
//! trivial handler over loopback, idle RSS. Run with `cargo bench --bench runtime`.
//!
//! Targets (issue 2): ready ≤ 20 ms, ≥ 10,000 invocations/s on 2 cores, idle RSS ≤ 15 MiB.
//! The load generator shares the machine (and its 2 cores) with the server, as the host would.

use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmbackup::runtime::{FunctionApp, FunctionSpec, Invocation, OutputBinding, Outputs, Trigger};

const START_RUNS: usize = 20;
const INVOCATIONS: usize = 40_000;
const CONCURRENCY: usize = 64;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
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

/// Process start to the first `200` on `GET /`, polling as fast as the host does (and faster).
fn start_up() -> (Vec<Duration>, Option<u64>) {
    let binary = env!("CARGO_BIN_EXE_vmbackup");
    let mut times = Vec::new();
    let mut idle_rss = None;
    for run in 0..START_RUNS {
        let port = free_port();
        let started = Instant::now();
        let Ok(mut child) = Command::new(binary)
            .arg("serve")
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .stdout(Stdio::null())
            .spawn()
        else {
            eprintln!("cannot start {binary}");
            break;
        };
        while !http_get_ok(port) {
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        times.push(started.elapsed());
        if run == 0 {
            std::thread::sleep(Duration::from_millis(500));
            idle_rss = rss_kib(child.id());
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort();
    (times, idle_rss)
}

fn trivial_app() -> FunctionApp {
    FunctionApp::new().function(
        FunctionSpec::new("echo", Trigger::service_bus("in"))
            .output(OutputBinding::service_bus("out", "out")),
        |inv: Invocation<Value>| async move {
            let mut outputs = Outputs::new();
            outputs.push("out", &inv.data)?;
            Ok(outputs)
        },
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn throughput() -> Result<(f64, Vec<Duration>), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/echo", listener.local_addr()?);
    tokio::spawn(vmbackup::runtime::serve_with_shutdown(
        listener,
        trivial_app(),
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
        client
            .post(&url)
            .body(body.clone())
            .send()
            .await?
            .bytes()
            .await?;
    }
    let started = Instant::now();
    let workers = (0..CONCURRENCY).map(|_| {
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(INVOCATIONS / CONCURRENCY);
            for _ in 0..INVOCATIONS / CONCURRENCY {
                let sent = Instant::now();
                let ok = match client.post(&url).body(body.clone()).send().await {
                    Ok(response) => {
                        response.status().is_success() && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
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
    Ok((latencies.len() as f64 / elapsed.as_secs_f64(), latencies))
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters nothing here.
    let (start_times, idle_rss) = start_up();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            std::process::exit(1);
        }
    };
    let (per_second, latencies) = match runtime.block_on(throughput()) {
        Ok(result) => result,
        Err(e) => {
            eprintln!("throughput run failed: {e}");
            std::process::exit(1);
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| measure | value | target |");
    println!("|---|---|---|");
    println!(
        "| process start → first 200 on GET / (median of {START_RUNS}) | {:.1} ms (min {:.1}, max {:.1}) | ≤ 20 ms |",
        ms(percentile(&start_times, 0.5)),
        ms(percentile(&start_times, 0.0)),
        ms(percentile(&start_times, 1.0)),
    );
    println!(
        "| invocations/s, trivial handler, {CONCURRENCY} concurrent, {} calls | {per_second:.0} | ≥ 10,000 |",
        latencies.len()
    );
    println!(
        "| latency p50 / p99 | {:.2} ms / {:.2} ms | |",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
    match idle_rss {
        Some(kib) => println!(
            "| idle RSS of `vmbackup serve` | {:.1} MiB | ≤ 15 MiB |",
            kib as f64 / 1024.0
        ),
        None => println!(
            "| idle RSS of `vmbackup serve` | not measured (/proc unavailable) | ≤ 15 MiB |"
        ),
    }
}
