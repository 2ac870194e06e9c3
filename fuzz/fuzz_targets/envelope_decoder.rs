//! Feeds bytes to the handler exactly as the Functions host would post an invocation body: through
//! the runtime's router (envelope parse, metadata, trigger payload) to functions whose payloads are
//! each CloudEvent type of the catalog, a timer and an HTTP request. The handlers only echo what was
//! decoded, so every path of the decoders is reached without Azure.
//!
//! Crashes: a panic anywhere, or a 5xx (malformed input must get a 4xx).

#![no_main]

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tower::ServiceExt;

#[path = "../../tests/bad_input/echo_app.rs"]
mod echo_app;

struct Target {
    runtime: tokio::runtime::Runtime,
    router: Router,
    functions: Vec<String>,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let app = echo_app::echo_app();
        let functions = app.specs().map(|spec| spec.name.clone()).collect();
        Target {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            router: app.router(),
            functions,
        }
    })
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks the function (by index in name order: http, timer, then the event types
    // sorted, as the seeds in fuzz/corpus-seed are written); the rest is the invocation body.
    let Some((&pick, body)) = input.split_first() else {
        return;
    };
    let target = target();
    let function = &target.functions[pick as usize % target.functions.len()];
    let request = Request::post(format!("/{function}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let response = target
        .runtime
        .block_on(target.router.clone().oneshot(request))
        .unwrap();
    assert!(
        !response.status().is_server_error(),
        "{function} answered {} to {:?}",
        response.status(),
        String::from_utf8_lossy(body)
    );
});
