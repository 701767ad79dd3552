//! A2A operations, their names in each protocol version, and the version rules.

use crate::error::{A2aError, ErrorKind};

/// An A2A operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Send a message; the answer is a task or a message.
    SendMessage,
    /// Send a message; the answer is a stream of events.
    SendStreamingMessage,
    /// A task's current state.
    GetTask,
    /// The caller's tasks (v1.0 only).
    ListTasks,
    /// Cancel a task.
    CancelTask,
    /// Resume the event stream of a task.
    SubscribeToTask,
    /// Set a push-notification configuration.
    CreatePushConfig,
    /// Read a push-notification configuration.
    GetPushConfig,
    /// List push-notification configurations.
    ListPushConfigs,
    /// Delete a push-notification configuration.
    DeletePushConfig,
    /// The authenticated extended card.
    GetExtendedAgentCard,
}

/// (method, v1.0 JSON-RPC name, v0.3 JSON-RPC name).
const NAMES: [(Method, &str, Option<&str>); 11] = [
    (Method::SendMessage, "SendMessage", Some("message/send")),
    (
        Method::SendStreamingMessage,
        "SendStreamingMessage",
        Some("message/stream"),
    ),
    (Method::GetTask, "GetTask", Some("tasks/get")),
    (Method::ListTasks, "ListTasks", None),
    (Method::CancelTask, "CancelTask", Some("tasks/cancel")),
    (
        Method::SubscribeToTask,
        "SubscribeToTask",
        Some("tasks/resubscribe"),
    ),
    (
        Method::CreatePushConfig,
        "CreateTaskPushNotificationConfig",
        Some("tasks/pushNotificationConfig/set"),
    ),
    (
        Method::GetPushConfig,
        "GetTaskPushNotificationConfig",
        Some("tasks/pushNotificationConfig/get"),
    ),
    (
        Method::ListPushConfigs,
        "ListTaskPushNotificationConfigs",
        Some("tasks/pushNotificationConfig/list"),
    ),
    (
        Method::DeletePushConfig,
        "DeleteTaskPushNotificationConfig",
        Some("tasks/pushNotificationConfig/delete"),
    ),
    (
        Method::GetExtendedAgentCard,
        "GetExtendedAgentCard",
        Some("agent/getAuthenticatedExtendedCard"),
    ),
];

impl Method {
    /// The v1.0 JSON-RPC method name (also the name on the `dmsc/1` binding).
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|row| row.0 == self)
            .map_or("", |row| row.1)
    }

    /// The v0.3 JSON-RPC method name, if v0.3 has the operation.
    pub fn v03_name(self) -> Option<&'static str> {
        NAMES.iter().find(|row| row.0 == self).and_then(|row| row.2)
    }

    /// The method with v1.0 name `name`.
    pub fn from_v1(name: &str) -> Option<Self> {
        NAMES.iter().find(|row| row.1 == name).map(|row| row.0)
    }

    /// The method with v0.3 name `name`.
    pub fn from_v03(name: &str) -> Option<Self> {
        NAMES
            .iter()
            .find(|row| row.2 == Some(name))
            .map(|row| row.0)
    }

    /// Whether the answer is a stream of events.
    pub fn is_streaming(self) -> bool {
        matches!(self, Self::SendStreamingMessage | Self::SubscribeToTask)
    }

    /// Whether the front door forwards it to an agent. Push notifications would reach the
    /// caller around the gateway, and the extended card is the front door's own (it has
    /// none), so those are answered by the front door.
    pub fn is_forwarded(self) -> bool {
        !matches!(
            self,
            Self::CreatePushConfig
                | Self::GetPushConfig
                | Self::ListPushConfigs
                | Self::DeletePushConfig
                | Self::GetExtendedAgentCard
        )
    }

    /// The front door's own answer to a method it does not forward.
    pub fn refusal(self) -> A2aError {
        if self == Self::GetExtendedAgentCard {
            A2aError::new(
                ErrorKind::ExtendedCardNotConfigured,
                "capability cards have no extended form",
            )
        } else {
            A2aError::new(
                ErrorKind::PushNotSupported,
                "push notifications are not offered through the gateway: \
                 use streaming or GetTask",
            )
        }
    }
}

/// Which protocol version and binding a caller speaks: the answer is written in the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// A2A v1.0, JSON-RPC binding.
    JsonRpc1,
    /// A2A v1.0, HTTP+JSON binding.
    Rest1,
    /// A2A v0.3, JSON-RPC binding.
    JsonRpc03,
}

/// The major version named by an `A2A-Version` header; a missing header means 0.3 (spec
/// §3.6: only 0.3 clients may omit it).
pub fn header_major(header: Option<&str>) -> Result<u32, A2aError> {
    let Some(value) = header.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(0);
    };
    value
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .ok_or_else(|| {
            A2aError::new(
                ErrorKind::VersionNotSupported,
                format!("A2A version {value:?} is not a version"),
            )
        })
}

/// The method and dialect of a JSON-RPC request with method `name` and version header
/// `header`. v0.3 names are v0.3 whatever the header says (a 0.3 client may send none);
/// v1.0 names need a 1.x header, as the a2a-sdk server requires.
pub fn jsonrpc_dialect(name: &str, header: Option<&str>) -> Result<(Method, Dialect), A2aError> {
    let major = header_major(header)?;
    if let Some(method) = Method::from_v03(name) {
        return Ok((method, Dialect::JsonRpc03));
    }
    let Some(method) = Method::from_v1(name) else {
        return Err(A2aError::new(
            ErrorKind::MethodNotFound,
            format!("method {name:?} not found"),
        ));
    };
    if major != 1 {
        return Err(unsupported_version(header));
    }
    Ok((method, Dialect::JsonRpc1))
}

/// The error for a version this front door does not speak.
pub fn unsupported_version(header: Option<&str>) -> A2aError {
    A2aError::new(
        ErrorKind::VersionNotSupported,
        format!(
            "A2A version '{}' is not supported here: send A2A-Version 1.0 (or use the v0.3 \
             method names)",
            header.unwrap_or("0.3")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (method, v1, v03) in NAMES {
            assert_eq!(Method::from_v1(v1), Some(method));
            assert_eq!(method.name(), v1);
            if let Some(v03) = v03 {
                assert_eq!(Method::from_v03(v03), Some(method));
            }
        }
    }

    #[test]
    fn version_rules() {
        assert_eq!(
            jsonrpc_dialect("SendMessage", Some("1.0")).unwrap(),
            (Method::SendMessage, Dialect::JsonRpc1)
        );
        assert_eq!(
            jsonrpc_dialect("message/send", None).unwrap(),
            (Method::SendMessage, Dialect::JsonRpc03)
        );
        let missing = jsonrpc_dialect("SendMessage", None).unwrap_err();
        assert_eq!(missing.kind, ErrorKind::VersionNotSupported);
        let future = jsonrpc_dialect("SendMessage", Some("2.0")).unwrap_err();
        assert_eq!(future.kind, ErrorKind::VersionNotSupported);
        let garbage = jsonrpc_dialect("SendMessage", Some("x")).unwrap_err();
        assert_eq!(garbage.kind, ErrorKind::VersionNotSupported);
        let unknown = jsonrpc_dialect("tasks/explode", Some("1.0")).unwrap_err();
        assert_eq!(unknown.kind, ErrorKind::MethodNotFound);
    }
}
