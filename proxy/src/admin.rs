//! The admin listener (127.0.0.1 by default): `/metrics` (Prometheus text),
//! `/healthz`, `/stats` (JSON), `POST /stats/reset`, `GET /admin/policy`
//! (what decides admission: the running plugin's digest, description,
//! config and load time, and the scheduler's state) and `PUT /admin/policy`
//! (hot reload: the body is a `.wasm` component, loaded with the configured
//! `--policy-config` and validated before it replaces the running policy).
//!
//! Every request first passes [`access`]: the `Host` rule, and the bearer
//! token when `--admin-token` is set. Without a token, changes are taken
//! only on a loopback listener. Refusals are counted in
//! `sluice_admin_denied_total{reason}`.

mod access;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::app::{App, LoadedPolicy, PolicySource};
use crate::body::{ProxyBody, full};
use crate::error::ProxyError;
use crate::telemetry;

/// Largest policy component accepted by `PUT /admin/policy`.
pub const MAX_POLICY_BYTES: usize = 64 << 20;

/// What an admin request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Stats,
    StatsReset,
    PolicyStatus,
    PolicyReload,
}

impl Route {
    /// The route for `method` on `path`, or why there is none.
    fn of(method: &Method, path: &str, query: Option<&str>) -> Result<Self, ProxyError> {
        match (method, path) {
            (&Method::GET, "/metrics") => Ok(Self::Metrics),
            (&Method::GET, "/healthz") => Ok(Self::Healthz),
            // It used to reset; a script that still asks must notice.
            (&Method::GET, "/stats") if query_flag(query, "reset") => {
                Err(ProxyError::ResetNeedsPost)
            }
            (&Method::GET, "/stats") => Ok(Self::Stats),
            (&Method::POST, "/stats/reset") => Ok(Self::StatsReset),
            (&Method::GET, "/admin/policy") => Ok(Self::PolicyStatus),
            (&Method::PUT, "/admin/policy") => Ok(Self::PolicyReload),
            (_, "/metrics" | "/healthz" | "/stats") => {
                Err(ProxyError::MethodNotAllowed { allow: "GET" })
            }
            (_, "/stats/reset") => Err(ProxyError::MethodNotAllowed { allow: "POST" }),
            (_, "/admin/policy") => Err(ProxyError::MethodNotAllowed { allow: "GET, PUT" }),
            (_, path) => Err(ProxyError::NotFound(path.to_owned())),
        }
    }

    /// The change a route makes, named for messages; `None` for reads.
    fn change(self) -> Option<&'static str> {
        match self {
            Self::StatsReset => Some("POST /stats/reset"),
            Self::PolicyReload => Some("PUT /admin/policy"),
            _ => None,
        }
    }
}

/// Serves one admin request.
pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<ProxyBody> {
    let result = match admit(&app, &request) {
        Ok(route) => serve(&app, route, request).await,
        Err(err) => Err(err),
    };
    result.unwrap_or_else(|err| {
        if matches!(
            err,
            ProxyError::Unauthorized { .. }
                | ProxyError::HostNotAllowed(_)
                | ProxyError::AdminTokenRequired(_)
        ) {
            telemetry::count_admin_denied(err.code());
        }
        err.into_response()
    })
}

/// The access rules, then the route: a request without the token learns
/// nothing about which routes exist.
fn admit(app: &App, request: &Request<Incoming>) -> Result<Route, ProxyError> {
    access::check(&app.config.admin, request.uri(), request.headers())?;
    let route = Route::of(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    )?;
    match route.change() {
        Some(change) if app.config.admin.token.is_none() && !app.admin_is_loopback() => {
            Err(ProxyError::AdminTokenRequired(change))
        }
        _ => Ok(route),
    }
}

async fn serve(
    app: &App,
    route: Route,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    match route {
        Route::Metrics => {
            crate::resources::sample();
            app.replicas.sample();
            Ok(text(
                app.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            ))
        }
        Route::Healthz => Ok(json(StatusCode::OK, json!({"status": "ok"}))),
        Route::Stats => Ok(json(StatusCode::OK, stats(app, false).await?)),
        Route::StatsReset => Ok(json(StatusCode::OK, stats(app, true).await?)),
        Route::PolicyStatus => Ok(json(StatusCode::OK, policy_status(app).await?)),
        Route::PolicyReload => reload_from_body(app, request).await,
    }
}

/// The statistics; with `reset`, those from before the reset.
async fn stats(app: &App, reset: bool) -> Result<Value, ProxyError> {
    let scheduler = match &app.admission {
        Some(admission) => Some(admission.status().await?),
        None => None,
    };
    let mut body = crate::stats::snapshot(reset);
    body["policy"] = serde_json::to_value(scheduler).unwrap_or_default();
    body["uptime_s"] = app.started.elapsed().as_secs_f64().into();
    body["accounting"] =
        serde_json::to_value(crate::ledger::global().balance()).unwrap_or_default();
    let replicas = app.replicas.all();
    if let Some(first) = replicas.first() {
        body["upstream"] = serde_json::to_value(first.engine.view()).unwrap_or_default();
    }
    body["route"] = serde_json::to_value(app.replicas.mode()).unwrap_or_default();
    body["replicas"] = replicas.iter().map(|r| replica_stats(r)).collect();
    body["gpus"] = match &app.gpus {
        Some(gpus) => serde_json::to_value(gpus.lock().map(|g| g.clone()).unwrap_or_default())
            .unwrap_or_default(),
        None => Value::String("n/a (no NVIDIA driver)".into()),
    };
    Ok(body)
}

/// One replica in `/stats`.
fn replica_stats(replica: &crate::replicas::Replica) -> Value {
    let engine = replica.engine.load();
    json!({
        "id": replica.id,
        "name": replica.name,
        "healthy": replica.healthy(),
        "in_flight": replica.in_flight(),
        "engine": {
            "running": engine.running,
            "waiting": engine.waiting,
            "kv_usage": engine.kv_usage,
        },
        "prefix_blocks": replica.prefix.len(),
        "kv_events": replica.events().map(|e| json!({
            "live": e.live(),
            "events": e.events(),
            "gaps": e.gaps(),
        })),
    })
}

/// The scheduler's state, the running plugin and the reloads so far.
async fn policy_status(app: &App) -> Result<Value, ProxyError> {
    let Some(admission) = &app.admission else {
        return Ok(json!({ "policy": "none (pass-through)" }));
    };
    let mut body = serde_json::to_value(admission.status().await?).unwrap_or_default();
    body["plugin"] = app.loaded_policy().as_ref().map_or(Value::Null, plugin);
    let reloads = app.reload_counts();
    body["reloads"] = json!({ "ok": reloads.ok, "rejected": reloads.rejected });
    Ok(body)
}

/// A loaded plugin as `GET /admin/policy` shows it.
fn plugin(loaded: &LoadedPolicy) -> Value {
    let config: serde_json::Map<String, Value> = loaded
        .config
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "name": loaded.name,
        "source": loaded.source.to_string(),
        "sha256": loaded.sha256,
        "size_bytes": loaded.size,
        "description": loaded.description,
        "config": config,
        "contract": loaded.contract.package(),
        "loaded_at": crate::units::format_rfc3339(loaded.loaded_at),
        "age_s": loaded.loaded.elapsed().as_secs_f64(),
    })
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
    let loaded = app.reload(PolicySource::Upload, bytes, config).await?;
    let mut body = policy_status(app).await?;
    body["status"] = "reloaded".into();
    // This reload's plugin, even if another has replaced it since.
    body["plugin"] = plugin(&loaded);
    Ok(json(StatusCode::OK, body))
}

/// Whether `name=1` (or `name=true`) is in the query string.
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv.split_once('='), Some((k, "1" | "true")) if k == name))
    })
}

fn json(status: StatusCode, value: Value) -> Response<ProxyBody> {
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
