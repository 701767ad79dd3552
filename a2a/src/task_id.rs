//! Task ids that say which agent holds the task (`docs/A2A.md` §3.4).
//!
//! Several agents may offer one capability, and an A2A task lives in one of them: follow-ups
//! (`GetTask`, `CancelTask`, `SubscribeToTask`, a message carrying `taskId`) must reach that
//! one. An agent on the binding therefore qualifies every task id it hands out with its own
//! `dmsc/1` session, as `<session, lowercase hex>~<its own id>`; the front door reads the
//! session back out of a follow-up's task id and asks the gateway for that session only
//! ([`dmsc_agent::RequestBuilder::target_session`]). No state is kept anywhere: the id is the
//! route. The adapter qualifies answers on the way out and strips its prefix on the way in,
//! so the agent behind it sees its own ids.

use dmsc_agent::SessionId;
use serde_json::Value;

use crate::method::Method;

/// The separator between the session and the agent's own id.
pub const SEPARATOR: char = '~';

/// The session a qualified task id names, if it is one.
pub fn session_of(task_id: &str) -> Option<SessionId> {
    let (session, rest) = task_id.split_once(SEPARATOR)?;
    let lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    if rest.is_empty() || session.is_empty() || session.len() > 16 {
        return None;
    }
    if !session.bytes().all(lower_hex) {
        return None;
    }
    u64::from_str_radix(session, 16)
        .ok()
        .filter(|&s| s != 0)
        .map(SessionId)
}

/// `id` qualified with `session`.
pub fn qualify(session: SessionId, id: &str) -> String {
    format!("{:x}{SEPARATOR}{id}", session.0)
}

/// The task id a follow-up refers to, from v1.0 params: `id` for the task methods, the
/// message's `taskId` for messages.
pub fn referenced(method: Method, params: &Value) -> Option<&str> {
    match method {
        Method::GetTask | Method::CancelTask | Method::SubscribeToTask => {
            params.get("id").and_then(Value::as_str)
        }
        Method::SendMessage | Method::SendStreamingMessage => params
            .get("message")
            .and_then(|m| m.get("taskId"))
            .and_then(Value::as_str),
        _ => None,
    }
}

/// Why a request's task id cannot be served here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignTask(pub String);

/// Strips `session`'s prefix from every task id in a request's v1.0 params; `Ok(true)` if any
/// id changed. An id qualified with another session is [`ForeignTask`] (the task is not held
/// here); an unqualified id is left alone.
pub fn strip(method: Method, params: &mut Value, session: SessionId) -> Result<bool, ForeignTask> {
    let mut result = Ok(false);
    let mut fix = |id: &mut String| {
        if let Some(owner) = session_of(id) {
            if owner == session {
                if let Some((_, rest)) = id.split_once(SEPARATOR) {
                    *id = rest.to_owned();
                    if let Ok(changed) = &mut result {
                        *changed = true;
                    }
                }
            } else if result.is_ok() {
                result = Err(ForeignTask(id.clone()));
            }
        }
    };
    if matches!(
        method,
        Method::GetTask | Method::CancelTask | Method::SubscribeToTask
    ) {
        if let Some(Value::String(id)) = params.get_mut("id") {
            fix(id);
        }
    }
    walk(params, &mut fix);
    result
}

/// Qualifies every task id in an answer (a JSON-RPC response object) of `method` with
/// `session`; true if any id changed.
pub fn qualify_answer(method: Method, response: &mut Value, session: SessionId) -> bool {
    let Some(result) = response.get_mut("result") else {
        return false;
    };
    let mut changed = false;
    let mut fix = |id: &mut String| {
        if session_of(id) != Some(session) {
            *id = qualify(session, id);
            changed = true;
        }
    };
    // Task objects carry their own id in `id`.
    let tasks: Vec<&mut Value> = match method {
        Method::GetTask | Method::CancelTask => vec![result],
        Method::ListTasks => match result.get_mut("tasks") {
            Some(Value::Array(tasks)) => tasks.iter_mut().collect(),
            _ => Vec::new(),
        },
        _ => result.get_mut("task").into_iter().collect(),
    };
    for task in tasks {
        if let Some(Value::String(id)) = task.get_mut("id") {
            fix(id);
        }
    }
    walk(result, &mut fix);
    changed
}

/// Applies `fix` to every `taskId` and `referenceTaskIds` entry under `value`.
fn walk(value: &mut Value, fix: &mut impl FnMut(&mut String)) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match (key.as_str(), v) {
                    ("taskId", Value::String(id)) => fix(id),
                    ("referenceTaskIds", Value::Array(ids)) => {
                        for id in ids {
                            if let Value::String(id) = id {
                                fix(id);
                            }
                        }
                    }
                    (_, v) => walk(v, fix),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, fix);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S: SessionId = SessionId(0x1_0000_0000_0002);

    #[test]
    fn qualified_ids_name_their_session() {
        let id = qualify(S, "abc~def");
        assert_eq!(id, "1000000000002~abc~def");
        assert_eq!(session_of(&id), Some(S));
        for plain in [
            "abc",
            "~abc",
            "xyz~abc",
            "0~abc",
            "1~",
            "11111111111111111~a",
            "+a~x",
            "A~x",
        ] {
            assert_eq!(session_of(plain), None, "{plain}");
        }
    }

    #[test]
    fn answers_are_qualified_and_requests_stripped() {
        let mut answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"task": {
            "id": "t1", "contextId": "c",
            "status": {"state": "TASK_STATE_COMPLETED", "message": {"taskId": "t1", "parts": []}},
            "history": [{"taskId": "t1", "referenceTaskIds": ["t0"], "parts": []}],
        }}});
        qualify_answer(Method::SendMessage, &mut answer, S);
        let task = &answer["result"]["task"];
        assert_eq!(task["id"], "1000000000002~t1");
        assert_eq!(task["status"]["message"]["taskId"], "1000000000002~t1");
        assert_eq!(
            task["history"][0]["referenceTaskIds"][0],
            "1000000000002~t0"
        );
        assert_eq!(task["contextId"], "c");

        let mut get = json!({"jsonrpc": "2.0", "id": 1, "result": {"id": "t1"}});
        qualify_answer(Method::GetTask, &mut get, S);
        assert_eq!(get["result"]["id"], "1000000000002~t1");
        let mut event = json!({"result": {"statusUpdate": {"taskId": "t1"}}});
        qualify_answer(Method::SendStreamingMessage, &mut event, S);
        assert_eq!(
            event["result"]["statusUpdate"]["taskId"],
            "1000000000002~t1"
        );

        let mut params = json!({"id": "1000000000002~t1"});
        assert_eq!(
            referenced(Method::GetTask, &params),
            Some("1000000000002~t1")
        );
        strip(Method::GetTask, &mut params, S).unwrap();
        assert_eq!(params["id"], "t1");
        let mut params = json!({"message": {"taskId": "1000000000002~t1", "parts": []}});
        strip(Method::SendMessage, &mut params, S).unwrap();
        assert_eq!(params["message"]["taskId"], "t1");
        let mut foreign = json!({"id": "5~t1"});
        assert!(strip(Method::CancelTask, &mut foreign, S).is_err());
        let mut plain = json!({"id": "t1"});
        strip(Method::CancelTask, &mut plain, S).unwrap();
        assert_eq!(plain["id"], "t1");
    }
}
