//! A2A v0.3 <-> v1.0 JSON.
//!
//! Everything inside the domain is v1.0 (the `dmsc/1` binding carries v1.0 JSON-RPC); a v0.3
//! caller's request is converted on the way in and every answer on the way out. The rules
//! follow the a2a-sdk's own compatibility layer (`a2a/compat/v0_3/conversions.py`): roles
//! `user`/`agent` <-> `ROLE_USER`/`ROLE_AGENT`, lowercase task states <-> `TASK_STATE_*`, parts
//! with a `kind` <-> parts by member, results with a `kind` discriminator <-> one-member
//! wrappers, `blocking` <-> `returnImmediately`, and `final` on status updates. Unknown
//! members are kept where both versions have them.

use serde_json::{json, Map, Value};

use crate::error::{A2aError, ErrorKind};
use crate::method::Method;

/// The members a message has in both versions, copied as they are.
const MESSAGE_KEYS: &[&str] = &[
    "messageId",
    "contextId",
    "taskId",
    "referenceTaskIds",
    "metadata",
    "extensions",
];

fn invalid(message: impl Into<String>) -> A2aError {
    A2aError::new(ErrorKind::InvalidParams, message)
}

fn object(value: &Value, what: &str) -> Result<Map<String, Value>, A2aError> {
    value
        .as_object()
        .cloned()
        .ok_or_else(|| invalid(format!("{what} must be an object")))
}

/// Copies the members named in `keys` that are present.
fn copy(from: &Map<String, Value>, to: &mut Map<String, Value>, keys: &[&str]) {
    for key in keys {
        if let Some(value) = from.get(*key) {
            if !value.is_null() {
                to.insert((*key).to_owned(), value.clone());
            }
        }
    }
}

/// v0.3 params of `method` as v1.0 params.
pub fn params_v03_to_v1(method: Method, params: &Value) -> Result<Value, A2aError> {
    let params = object(params, "params")?;
    let mut out = Map::new();
    match method {
        Method::SendMessage | Method::SendStreamingMessage => {
            let message = params
                .get("message")
                .ok_or_else(|| invalid("params.message is required"))?;
            out.insert("message".into(), message_v03_to_v1(message)?);
            if let Some(config) = params.get("configuration").filter(|c| !c.is_null()) {
                out.insert("configuration".into(), configuration_v03_to_v1(config)?);
            }
            copy(&params, &mut out, &["metadata"]);
        }
        Method::GetTask => {
            copy(&params, &mut out, &["id", "metadata"]);
            // v0.3 treats 0 as "all"; v1.0 leaves it unset for that.
            if let Some(n) = params.get("historyLength").and_then(Value::as_u64) {
                if n > 0 {
                    out.insert("historyLength".into(), n.into());
                }
            }
        }
        _ => copy(&params, &mut out, &["id", "metadata"]),
    }
    Ok(Value::Object(out))
}

fn configuration_v03_to_v1(config: &Value) -> Result<Value, A2aError> {
    let config = object(config, "params.configuration")?;
    if config
        .get("pushNotificationConfig")
        .is_some_and(|v| !v.is_null())
    {
        return Err(A2aError::new(
            ErrorKind::PushNotSupported,
            "push notifications are not offered through the gateway",
        ));
    }
    let mut out = Map::new();
    copy(&config, &mut out, &["acceptedOutputModes"]);
    if let Some(n) = config.get("historyLength").and_then(Value::as_u64) {
        if n > 0 {
            out.insert("historyLength".into(), n.into());
        }
    }
    if let Some(blocking) = config.get("blocking").and_then(Value::as_bool) {
        out.insert("returnImmediately".into(), (!blocking).into());
    }
    Ok(Value::Object(out))
}

/// A v0.3 message as v1.0.
pub fn message_v03_to_v1(message: &Value) -> Result<Value, A2aError> {
    let message = object(message, "message")?;
    let mut out = Map::new();
    copy(&message, &mut out, MESSAGE_KEYS);
    let role = match message.get("role").and_then(Value::as_str) {
        Some("user") => "ROLE_USER",
        Some("agent") => "ROLE_AGENT",
        other => {
            return Err(invalid(format!(
                "message.role {other:?} is not user or agent"
            )))
        }
    };
    out.insert("role".into(), role.into());
    let parts = message
        .get("parts")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("message.parts must be a list"))?;
    let parts: Result<Vec<Value>, A2aError> = parts.iter().map(part_v03_to_v1).collect();
    out.insert("parts".into(), Value::Array(parts?));
    Ok(Value::Object(out))
}

fn part_v03_to_v1(part: &Value) -> Result<Value, A2aError> {
    let part = object(part, "part")?;
    let mut out = Map::new();
    let mut metadata = part.get("metadata").and_then(Value::as_object).cloned();
    match part.get("kind").and_then(Value::as_str) {
        Some("text") => {
            copy(&part, &mut out, &["text"]);
        }
        Some("data") => {
            let data = part.get("data").cloned().unwrap_or(Value::Null);
            // A non-object value travelled as {"value": x} with a marker.
            let wrapped = metadata
                .as_mut()
                .and_then(|m| m.remove("data_part_compat"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let data = if wrapped {
                data.get("value").cloned().unwrap_or(Value::Null)
            } else {
                data
            };
            out.insert("data".into(), data);
        }
        Some("file") => {
            let file = part
                .get("file")
                .and_then(Value::as_object)
                .ok_or_else(|| invalid("a file part needs a file object"))?;
            if let Some(bytes) = file.get("bytes") {
                out.insert("raw".into(), bytes.clone());
            } else if let Some(uri) = file.get("uri") {
                out.insert("url".into(), uri.clone());
            } else {
                return Err(invalid("a file needs bytes or uri"));
            }
            if let Some(mime) = file.get("mimeType").filter(|v| !v.is_null()) {
                out.insert("mediaType".into(), mime.clone());
            }
            if let Some(name) = file.get("name").filter(|v| !v.is_null()) {
                out.insert("filename".into(), name.clone());
            }
        }
        other => {
            return Err(invalid(format!(
                "part kind {other:?} is not text, data or file"
            )))
        }
    }
    if let Some(metadata) = metadata.filter(|m| !m.is_empty()) {
        out.insert("metadata".into(), Value::Object(metadata));
    }
    Ok(Value::Object(out))
}

/// A v1.0 `result` of `method` as v0.3.
pub fn result_v1_to_v03(method: Method, result: &Value) -> Value {
    match method {
        Method::SendMessage | Method::SendStreamingMessage | Method::SubscribeToTask => {
            event_v1_to_v03(result)
        }
        Method::GetTask | Method::CancelTask => task_v1_to_v03(result),
        _ => result.clone(),
    }
}

/// A v1.0 send result or stream event (`{"task"|"message"|"statusUpdate"|"artifactUpdate":
/// ...}`) as the flat v0.3 form with a `kind`.
pub fn event_v1_to_v03(event: &Value) -> Value {
    if let Some(task) = event.get("task") {
        task_v1_to_v03(task)
    } else if let Some(message) = event.get("message") {
        message_v1_to_v03(message)
    } else if let Some(update) = event.get("statusUpdate") {
        let mut out = keep(update, &["taskId", "contextId", "metadata"]);
        let status = update
            .get("status")
            .map(status_v1_to_v03)
            .unwrap_or_else(|| json!({"state": "unknown"}));
        let is_final = matches!(
            status.get("state").and_then(Value::as_str),
            Some("completed" | "canceled" | "failed" | "rejected")
        );
        out.insert("kind".into(), "status-update".into());
        out.insert("status".into(), status);
        out.insert("final".into(), is_final.into());
        Value::Object(out)
    } else if let Some(update) = event.get("artifactUpdate") {
        let mut out = keep(
            update,
            &["taskId", "contextId", "append", "lastChunk", "metadata"],
        );
        out.insert("kind".into(), "artifact-update".into());
        if let Some(artifact) = update.get("artifact") {
            out.insert("artifact".into(), artifact_v1_to_v03(artifact));
        }
        Value::Object(out)
    } else {
        event.clone()
    }
}

fn keep(from: &Value, keys: &[&str]) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(from) = from.as_object() {
        copy(from, &mut out, keys);
    }
    out
}

/// A v1.0 task as v0.3.
pub fn task_v1_to_v03(task: &Value) -> Value {
    let mut out = keep(task, &["id", "contextId", "metadata"]);
    out.insert("kind".into(), "task".into());
    let status = task
        .get("status")
        .map(status_v1_to_v03)
        .unwrap_or_else(|| json!({"state": "unknown"}));
    out.insert("status".into(), status);
    if let Some(history) = task.get("history").and_then(Value::as_array) {
        let history = history.iter().map(message_v1_to_v03).collect();
        out.insert("history".into(), Value::Array(history));
    }
    if let Some(artifacts) = task.get("artifacts").and_then(Value::as_array) {
        let artifacts = artifacts.iter().map(artifact_v1_to_v03).collect();
        out.insert("artifacts".into(), Value::Array(artifacts));
    }
    Value::Object(out)
}

fn status_v1_to_v03(status: &Value) -> Value {
    let mut out = keep(status, &["timestamp"]);
    let state = status
        .get("state")
        .and_then(Value::as_str)
        .map_or("unknown", state_v1_to_v03);
    out.insert("state".into(), state.into());
    if let Some(message) = status.get("message") {
        out.insert("message".into(), message_v1_to_v03(message));
    }
    Value::Object(out)
}

/// A v1.0 task state name as v0.3.
pub fn state_v1_to_v03(state: &str) -> &'static str {
    match state {
        "TASK_STATE_SUBMITTED" => "submitted",
        "TASK_STATE_WORKING" => "working",
        "TASK_STATE_INPUT_REQUIRED" => "input-required",
        "TASK_STATE_COMPLETED" => "completed",
        "TASK_STATE_CANCELED" => "canceled",
        "TASK_STATE_FAILED" => "failed",
        "TASK_STATE_REJECTED" => "rejected",
        "TASK_STATE_AUTH_REQUIRED" => "auth-required",
        _ => "unknown",
    }
}

fn artifact_v1_to_v03(artifact: &Value) -> Value {
    let mut out = keep(
        artifact,
        &[
            "artifactId",
            "name",
            "description",
            "metadata",
            "extensions",
        ],
    );
    out.insert("parts".into(), parts_v1_to_v03(artifact.get("parts")));
    Value::Object(out)
}

/// A v1.0 message as v0.3.
pub fn message_v1_to_v03(message: &Value) -> Value {
    let mut out = keep(message, MESSAGE_KEYS);
    out.insert("kind".into(), "message".into());
    let role = match message.get("role").and_then(Value::as_str) {
        Some("ROLE_USER") => "user",
        _ => "agent",
    };
    out.insert("role".into(), role.into());
    out.insert("parts".into(), parts_v1_to_v03(message.get("parts")));
    Value::Object(out)
}

fn parts_v1_to_v03(parts: Option<&Value>) -> Value {
    let parts = parts
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    Value::Array(parts.iter().map(part_v1_to_v03).collect())
}

fn part_v1_to_v03(part: &Value) -> Value {
    let mut metadata = part.get("metadata").and_then(Value::as_object).cloned();
    let mut out = Map::new();
    if let Some(text) = part.get("text") {
        out.insert("kind".into(), "text".into());
        out.insert("text".into(), text.clone());
    } else if let Some(data) = part.get("data") {
        out.insert("kind".into(), "data".into());
        if data.is_object() {
            out.insert("data".into(), data.clone());
        } else {
            out.insert("data".into(), json!({"value": data}));
            metadata
                .get_or_insert_with(Map::new)
                .insert("data_part_compat".into(), true.into());
        }
    } else {
        let mut file = Map::new();
        if let Some(raw) = part.get("raw") {
            file.insert("bytes".into(), raw.clone());
        } else if let Some(url) = part.get("url") {
            file.insert("uri".into(), url.clone());
        }
        if let Some(media) = part.get("mediaType") {
            file.insert("mimeType".into(), media.clone());
        }
        if let Some(name) = part.get("filename") {
            file.insert("name".into(), name.clone());
        }
        out.insert("kind".into(), "file".into());
        out.insert("file".into(), Value::Object(file));
    }
    if let Some(metadata) = metadata {
        out.insert("metadata".into(), Value::Object(metadata));
    }
    Value::Object(out)
}

// ---- towards agents that speak only v0.3 (the adapter) ----

/// v1.0 params of `method` as v0.3 params, for an agent that speaks only v0.3.
pub fn params_v1_to_v03(method: Method, params: &Value) -> Result<Value, A2aError> {
    let params = object(params, "params")?;
    let mut out = Map::new();
    match method {
        Method::SendMessage | Method::SendStreamingMessage => {
            let message = params
                .get("message")
                .ok_or_else(|| invalid("params.message is required"))?;
            out.insert("message".into(), message_v1_to_v03(message));
            if let Some(config) = params.get("configuration").and_then(Value::as_object) {
                let mut c = Map::new();
                copy(config, &mut c, &["acceptedOutputModes", "historyLength"]);
                let immediately = config
                    .get("returnImmediately")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                c.insert("blocking".into(), (!immediately).into());
                out.insert("configuration".into(), Value::Object(c));
            }
            copy(&params, &mut out, &["metadata"]);
        }
        Method::GetTask => copy(&params, &mut out, &["id", "historyLength", "metadata"]),
        Method::CancelTask | Method::SubscribeToTask => {
            copy(&params, &mut out, &["id", "metadata"])
        }
        _ => {
            return Err(A2aError::new(
                ErrorKind::UnsupportedOperation,
                format!("{} has no v0.3 form", method.name()),
            ))
        }
    }
    Ok(Value::Object(out))
}

/// A v0.3 agent's `result` of `method` in v1.0 form: send results and stream events get their
/// one-member wrapper, tasks their v1.0 shape.
pub fn result_v03_to_v1(method: Method, result: &Value) -> Result<Value, A2aError> {
    let bad = |e: A2aError| {
        A2aError::new(
            ErrorKind::InvalidAgentResponse,
            format!("the agent's v0.3 answer: {}", e.message),
        )
    };
    if matches!(method, Method::GetTask | Method::CancelTask) {
        return task_v03_to_v1(result).map_err(bad);
    }
    let wrapped = match result.get("kind").and_then(Value::as_str) {
        Some("task") => json!({"task": task_v03_to_v1(result).map_err(bad)?}),
        Some("message") => json!({"message": message_v03_to_v1(result).map_err(bad)?}),
        Some("status-update") => {
            let mut update = keep(result, &["taskId", "contextId", "metadata"]);
            if let Some(status) = result.get("status") {
                update.insert("status".into(), status_v03_to_v1(status).map_err(bad)?);
            }
            json!({"statusUpdate": update})
        }
        Some("artifact-update") => {
            let mut update = keep(
                result,
                &["taskId", "contextId", "append", "lastChunk", "metadata"],
            );
            if let Some(artifact) = result.get("artifact") {
                update.insert(
                    "artifact".into(),
                    artifact_v03_to_v1(artifact).map_err(bad)?,
                );
            }
            json!({"artifactUpdate": update})
        }
        other => {
            return Err(A2aError::new(
                ErrorKind::InvalidAgentResponse,
                format!("the agent's v0.3 answer has kind {other:?}"),
            ))
        }
    };
    Ok(wrapped)
}

fn task_v03_to_v1(task: &Value) -> Result<Value, A2aError> {
    let mut out = keep(task, &["id", "contextId", "metadata"]);
    if let Some(status) = task.get("status") {
        out.insert("status".into(), status_v03_to_v1(status)?);
    }
    if let Some(history) = task.get("history").and_then(Value::as_array) {
        let history: Result<Vec<Value>, A2aError> = history.iter().map(message_v03_to_v1).collect();
        out.insert("history".into(), Value::Array(history?));
    }
    if let Some(artifacts) = task.get("artifacts").and_then(Value::as_array) {
        let artifacts: Result<Vec<Value>, A2aError> =
            artifacts.iter().map(artifact_v03_to_v1).collect();
        out.insert("artifacts".into(), Value::Array(artifacts?));
    }
    Ok(Value::Object(out))
}

fn status_v03_to_v1(status: &Value) -> Result<Value, A2aError> {
    let mut out = keep(status, &["timestamp"]);
    let state = status
        .get("state")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    out.insert("state".into(), state_v03_to_v1(state).into());
    if let Some(message) = status.get("message").filter(|m| !m.is_null()) {
        out.insert("message".into(), message_v03_to_v1(message)?);
    }
    Ok(Value::Object(out))
}

/// A v0.3 task state name as v1.0.
pub fn state_v03_to_v1(state: &str) -> &'static str {
    match state {
        "submitted" => "TASK_STATE_SUBMITTED",
        "working" => "TASK_STATE_WORKING",
        "input-required" => "TASK_STATE_INPUT_REQUIRED",
        "completed" => "TASK_STATE_COMPLETED",
        "canceled" => "TASK_STATE_CANCELED",
        "failed" => "TASK_STATE_FAILED",
        "rejected" => "TASK_STATE_REJECTED",
        "auth-required" => "TASK_STATE_AUTH_REQUIRED",
        _ => "TASK_STATE_UNSPECIFIED",
    }
}

fn artifact_v03_to_v1(artifact: &Value) -> Result<Value, A2aError> {
    let mut out = keep(
        artifact,
        &[
            "artifactId",
            "name",
            "description",
            "metadata",
            "extensions",
        ],
    );
    let parts = artifact
        .get("parts")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let parts: Result<Vec<Value>, A2aError> = parts.iter().map(part_v03_to_v1).collect();
    out.insert("parts".into(), Value::Array(parts?));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v03_send_becomes_v1() {
        let params = json!({
            "message": {
                "kind": "message", "messageId": "m1", "role": "user", "contextId": "c1",
                "parts": [
                    {"kind": "text", "text": "hi"},
                    {"kind": "data", "data": {"a": 1}},
                    {"kind": "file", "file": {"bytes": "aGk=", "mimeType": "text/plain", "name": "x"}},
                    {"kind": "data", "data": {"value": [1, 2]}, "metadata": {"data_part_compat": true}},
                ],
            },
            "configuration": {"blocking": false, "historyLength": 0, "acceptedOutputModes": ["text/plain"]},
        });
        let v1 = params_v03_to_v1(Method::SendMessage, &params).unwrap();
        assert_eq!(
            v1,
            json!({
                "message": {
                    "messageId": "m1", "contextId": "c1", "role": "ROLE_USER",
                    "parts": [
                        {"text": "hi"},
                        {"data": {"a": 1}},
                        {"raw": "aGk=", "mediaType": "text/plain", "filename": "x"},
                        {"data": [1, 2]},
                    ],
                },
                "configuration": {"acceptedOutputModes": ["text/plain"], "returnImmediately": true},
            })
        );
    }

    #[test]
    fn v1_calls_reach_a_v03_agent_and_its_answers_come_back() {
        let v1 = json!({
            "message": {"messageId": "m", "role": "ROLE_USER", "taskId": "t", "parts": [{"text": "hi"}]},
            "configuration": {"returnImmediately": true, "acceptedOutputModes": ["text/plain"]},
        });
        let v03 = params_v1_to_v03(Method::SendMessage, &v1).unwrap();
        assert_eq!(v03["message"]["kind"], "message");
        assert_eq!(v03["message"]["role"], "user");
        assert_eq!(
            v03["message"]["parts"][0],
            json!({"kind": "text", "text": "hi"})
        );
        assert_eq!(v03["configuration"]["blocking"], false);
        // ... and back: the request round-trips.
        assert_eq!(params_v03_to_v1(Method::SendMessage, &v03).unwrap(), v1);
        assert!(params_v1_to_v03(Method::ListTasks, &json!({})).is_err());

        let task = json!({"kind": "task", "id": "t", "contextId": "c",
            "status": {"state": "input-required", "message": {"kind": "message", "messageId": "x",
                       "role": "agent", "parts": [{"kind": "text", "text": "more?"}]}},
            "artifacts": [{"artifactId": "a", "parts": [{"kind": "text", "text": "r"}]}]});
        let v1 = result_v03_to_v1(Method::SendMessage, &task).unwrap();
        assert_eq!(v1["task"]["status"]["state"], "TASK_STATE_INPUT_REQUIRED");
        assert_eq!(v1["task"]["status"]["message"]["role"], "ROLE_AGENT");
        assert_eq!(v1["task"]["artifacts"][0]["parts"][0], json!({"text": "r"}));
        // A task round-trips through both directions.
        assert_eq!(result_v1_to_v03(Method::SendMessage, &v1), task);
        let got = result_v03_to_v1(Method::GetTask, &task).unwrap();
        assert_eq!(got["id"], "t");
        let update = json!({"kind": "status-update", "taskId": "t", "final": true,
                            "status": {"state": "completed"}});
        let v1 = result_v03_to_v1(Method::SendStreamingMessage, &update).unwrap();
        assert_eq!(
            v1["statusUpdate"]["status"]["state"],
            "TASK_STATE_COMPLETED"
        );
        let bad = result_v03_to_v1(Method::SendMessage, &json!({"kind": "nonsense"}));
        assert_eq!(bad.unwrap_err().kind, ErrorKind::InvalidAgentResponse);
    }

    #[test]
    fn bad_v03_input_is_invalid_params() {
        for params in [
            json!([]),
            json!({}),
            json!({"message": {"role": "robot", "parts": []}}),
            json!({"message": {"role": "user", "parts": [{"kind": "video"}]}}),
            json!({"message": {"role": "user", "parts": "hi"}}),
        ] {
            let e = params_v03_to_v1(Method::SendMessage, &params).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidParams, "{params}");
        }
        let push = json!({"message": {"role": "user", "parts": []},
                          "configuration": {"pushNotificationConfig": {"url": "http://x"}}});
        let e = params_v03_to_v1(Method::SendMessage, &push).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PushNotSupported);
    }

    #[test]
    fn v1_results_become_v03() {
        let task = json!({"task": {
            "id": "t1", "contextId": "c1",
            "status": {"state": "TASK_STATE_COMPLETED", "timestamp": "2026-12-01T00:00:00Z"},
            "artifacts": [{"artifactId": "a1", "parts": [{"text": "done"}, {"data": 3}]}],
            "history": [{"messageId": "m1", "role": "ROLE_USER", "parts": [{"url": "http://f", "mediaType": "image/png"}]}],
        }});
        assert_eq!(
            result_v1_to_v03(Method::SendMessage, &task),
            json!({
                "kind": "task", "id": "t1", "contextId": "c1",
                "status": {"state": "completed", "timestamp": "2026-12-01T00:00:00Z"},
                "artifacts": [{"artifactId": "a1", "parts": [
                    {"kind": "text", "text": "done"},
                    {"kind": "data", "data": {"value": 3}, "metadata": {"data_part_compat": true}},
                ]}],
                "history": [{"kind": "message", "messageId": "m1", "role": "user", "parts": [
                    {"kind": "file", "file": {"uri": "http://f", "mimeType": "image/png"}},
                ]}],
            })
        );
        let update = json!({"statusUpdate": {"taskId": "t1", "contextId": "c1",
                                              "status": {"state": "TASK_STATE_WORKING"}}});
        let v03 = event_v1_to_v03(&update);
        assert_eq!(v03["kind"], "status-update");
        assert_eq!(v03["final"], false);
        let done =
            json!({"statusUpdate": {"taskId": "t1", "status": {"state": "TASK_STATE_FAILED"}}});
        assert_eq!(event_v1_to_v03(&done)["final"], true);
        let artifact = json!({"artifactUpdate": {"taskId": "t1", "lastChunk": true,
                                                  "artifact": {"artifactId": "a", "parts": [{"text": "x"}]}}});
        let v03 = event_v1_to_v03(&artifact);
        assert_eq!(v03["kind"], "artifact-update");
        assert_eq!(v03["artifact"]["parts"][0]["kind"], "text");
        let message = json!({"message": {"messageId": "m", "role": "ROLE_AGENT", "parts": []}});
        assert_eq!(event_v1_to_v03(&message)["role"], "agent");
        assert_eq!(
            result_v1_to_v03(
                Method::GetTask,
                &json!({"id": "t", "status": {"state": "TASK_STATE_CANCELED"}})
            )["status"]["state"],
            "canceled"
        );
    }
}
