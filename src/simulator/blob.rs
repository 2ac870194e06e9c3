//! Blob data plane at each storage account's `primaryEndpoints.blob` (`{base}/blob/{account}/`):
//! GET and PUT (BlockBlob) of blobs the restore jobs write.

use super::http::{Body, Reply, Request};
use super::state::{Blob, SimState};
use axum::http::{Method, StatusCode};

/// Storage's XML error body.
pub fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    Reply {
        status,
        headers: vec![("x-ms-error-code".into(), code.into())],
        body: Body::Bytes {
            content: body.into_bytes(),
            content_type: "application/xml".into(),
        },
    }
}

pub fn blob_key(account: &str, container: &str, blob: &str) -> String {
    format!("{}/{container}/{blob}", account.to_ascii_lowercase())
}

pub fn route(state: &mut SimState, request: &Request) -> Reply {
    // segments: blob / {account} / {container} / {blob path…}
    let Some(account) = request.segments.get(1) else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidUri",
            "The requested URI does not represent any resource on the server.",
        );
    };
    if !state
        .storage_accounts
        .iter()
        .any(|a| a.name.eq_ignore_ascii_case(account))
    {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            "The specified resource does not exist.",
        );
    }
    if request.segments.len() < 4 {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidUri",
            "The simulator serves blobs only (account/container/blob).",
        );
    }
    let container = &request.segments[2];
    let blob = request.segments[3..].join("/");
    let key = blob_key(account, container, &blob);
    match request.method {
        Method::GET | Method::HEAD => match state.blobs.get(&key) {
            Some(found) => Reply {
                status: StatusCode::OK,
                headers: vec![("x-ms-blob-type".into(), "BlockBlob".into())],
                body: Body::Bytes {
                    content: found.content.clone(),
                    content_type: found.content_type.clone(),
                },
            },
            None => error(
                StatusCode::NOT_FOUND,
                "BlobNotFound",
                "The specified blob does not exist.",
            ),
        },
        Method::PUT => {
            let content_type = request
                .headers
                .get("x-ms-blob-content-type")
                .or_else(|| request.headers.get("content-type"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_string();
            state.blobs.insert(
                key,
                Blob {
                    content: request.body.to_vec(),
                    content_type,
                },
            );
            Reply::empty(StatusCode::CREATED)
        }
        Method::DELETE => match state.blobs.remove(&key) {
            Some(_) => Reply::empty(StatusCode::ACCEPTED),
            None => error(
                StatusCode::NOT_FOUND,
                "BlobNotFound",
                "The specified blob does not exist.",
            ),
        },
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UnsupportedHttpVerb",
            "The resource doesn't support the specified HTTP verb.",
        ),
    }
}
