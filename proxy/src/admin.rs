//! The admin listener (127.0.0.1 by default): `/metrics` (Prometheus text),
//! `/stats` (JSON), `GET /admin/policy` (what decides admission) and
//! `PUT /admin/policy` (hot reload: the body is a `.wasm` component, loaded
//! with the configured `--policy-config` and validated before it replaces
//! the running policy).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::app::App;
use crate::body::{ProxyBody, full};
use crate::error::ProxyError;

/// Largest policy component accepted by `PUT /admin/policy`.
pub const MAX_POLICY_BYTES: usize = 64 << 20;

/// Serves one admin request.
pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<ProxyBody> {
    let result = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => Ok(text(
            {
                crate::resources::sample();
                app.metrics.render()
            },
            "text/plain; version=0.0.4; charset=utf-8",
        )),
        (&Method::GET, "/healthz") => Ok(json(StatusCode::OK, serde_json::json!({"status": "ok"}))),
        (&Method::GET, "/stats") => stats(&app, request.uri().query()).await,
        (&Method::GET, "/admin/policy") => policy_status(&app).await,
        (&Method::PUT, "/admin/policy") => reload_from_body(&app, request).await,
        (_, "/metrics" | "/healthz" | "/stats" | "/admin/policy") => {
            Err(ProxyError::MethodNotAllowed)
        }
        (_, path) => Err(ProxyError::NotFound(path.to_owned())),
    };
    result.unwrap_or_else(ProxyError::into_response)
}

async fn stats(app: &App, query: Option<&str>) -> Result<Response<ProxyBody>, ProxyError> {
    let scheduler = match &app.admission {
        Some(admission) => Some(admission.status().await?),
        None => None,
    };
    let reset = query_flag(query, "reset");
    let mut body = crate::stats::snapshot(reset);
    body["policy"] = serde_json::to_value(scheduler).unwrap_or_default();
    body["uptime_s"] = app.started.elapsed().as_secs_f64().into();
    body["accounting"] =
        serde_json::to_value(crate::ledger::global().balance()).unwrap_or_default();
    body["upstream"] = serde_json::to_value(app.upstream_metrics.view()).unwrap_or_default();
    body["gpus"] = match &app.gpus {
        Some(gpus) => serde_json::to_value(gpus.lock().map(|g| g.clone()).unwrap_or_default())
            .unwrap_or_default(),
        None => serde_json::Value::String("n/a (no NVIDIA driver)".into()),
    };
    Ok(json(StatusCode::OK, body))
}

async fn policy_status(app: &App) -> Result<Response<ProxyBody>, ProxyError> {
    match &app.admission {
        Some(admission) => Ok(json(
            StatusCode::OK,
            serde_json::to_value(admission.status().await?).unwrap_or_default(),
        )),
        None => Ok(json(
            StatusCode::OK,
            serde_json::json!({ "policy": "none (pass-through)" }),
        )),
    }
}

async fn reload_from_body(
    app: &App,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // `PUT /admin/policy?limit=5&key=tenant` gives the new plugin its own
    // configuration; without a query it gets the configured --policy-config.
    let config: Option<Vec<(String, String)>> = request.uri().query().map(|q| {
        q.split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    });
    let bytes = Limited::new(request.into_body(), MAX_POLICY_BYTES)
        .collect()
        .await
        .map_err(|_| ProxyError::BodyTooLarge {
            limit: MAX_POLICY_BYTES as u64,
        })?
        .to_bytes();
    match app.reload("uploaded", bytes, config).await {
        Ok(description) => Ok(json(
            StatusCode::OK,
            serde_json::json!({ "status": "reloaded", "policy": description }),
        )),
        Err(err) => Err(err),
    }
}

/// Whether `name=1` (or `name=true`) is in the query string.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv.split_once('='), Some((k, "1" | "true")) if k == name))
    })
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text(body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(body)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
