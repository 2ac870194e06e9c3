//! Function declarations: the single source of truth for routing and for `function.json`.

use serde_json::{json, Map, Value};

/// The app setting that names the Service Bus connection (identity-based in Azure:
/// `ServiceBusConnection__fullyQualifiedNamespace`).
pub const DEFAULT_SERVICE_BUS_CONNECTION: &str = "ServiceBusConnection";

/// Who may call an HTTP-triggered function (`authLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthLevel {
    Anonymous,
    Function,
    Admin,
}

impl AuthLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthLevel::Anonymous => "anonymous",
            AuthLevel::Function => "function",
            AuthLevel::Admin => "admin",
        }
    }
}

/// What starts a function. `name` is the binding name: the key of the payload in `Data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    ServiceBus {
        name: String,
        queue: String,
        connection: String,
    },
    Timer {
        name: String,
        /// NCRONTAB (six fields) or `%AppSetting%`.
        schedule: String,
        run_on_startup: bool,
    },
    Http {
        name: String,
        auth_level: AuthLevel,
        methods: Vec<String>,
        route: Option<String>,
    },
}

impl Trigger {
    /// A Service Bus queue trigger with binding name `message` on the default connection.
    pub fn service_bus(queue: &str) -> Self {
        Trigger::ServiceBus {
            name: "message".into(),
            queue: queue.into(),
            connection: DEFAULT_SERVICE_BUS_CONNECTION.into(),
        }
    }

    /// A timer trigger with binding name `timer`.
    pub fn timer(schedule: &str) -> Self {
        Trigger::Timer {
            name: "timer".into(),
            schedule: schedule.into(),
            run_on_startup: false,
        }
    }

    /// An HTTP trigger with binding name `req`.
    pub fn http(auth_level: AuthLevel, methods: &[&str]) -> Self {
        Trigger::Http {
            name: "req".into(),
            auth_level,
            methods: methods.iter().map(|m| m.to_string()).collect(),
            route: None,
        }
    }

    pub fn binding_name(&self) -> &str {
        match self {
            Trigger::ServiceBus { name, .. }
            | Trigger::Timer { name, .. }
            | Trigger::Http { name, .. } => name,
        }
    }

    fn binding(&self) -> Value {
        match self {
            Trigger::ServiceBus {
                name,
                queue,
                connection,
            } => json!({
                "type": "serviceBusTrigger", "direction": "in", "name": name,
                "queueName": queue, "connection": connection,
            }),
            Trigger::Timer {
                name,
                schedule,
                run_on_startup,
            } => {
                let mut binding = json!({
                    "type": "timerTrigger", "direction": "in", "name": name, "schedule": schedule,
                });
                if *run_on_startup {
                    binding["runOnStartup"] = Value::Bool(true);
                }
                binding
            }
            Trigger::Http {
                name,
                auth_level,
                methods,
                route,
            } => {
                let mut binding = json!({
                    "type": "httpTrigger", "direction": "in", "name": name,
                    "authLevel": auth_level.as_str(), "methods": methods,
                });
                if let Some(route) = route {
                    binding["route"] = Value::String(route.clone());
                }
                binding
            }
        }
    }
}

/// Where a function's results go. `name` is the key in the response's `Outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputBinding {
    ServiceBus {
        name: String,
        queue: String,
        connection: String,
    },
    Http {
        name: String,
    },
}

impl OutputBinding {
    /// A Service Bus queue output on the default connection.
    pub fn service_bus(name: &str, queue: &str) -> Self {
        OutputBinding::ServiceBus {
            name: name.into(),
            queue: queue.into(),
            connection: DEFAULT_SERVICE_BUS_CONNECTION.into(),
        }
    }

    /// The HTTP response of an HTTP-triggered function, binding name `res`.
    pub fn http() -> Self {
        OutputBinding::Http { name: "res".into() }
    }

    pub fn name(&self) -> &str {
        match self {
            OutputBinding::ServiceBus { name, .. } | OutputBinding::Http { name } => name,
        }
    }

    fn binding(&self) -> Value {
        match self {
            OutputBinding::ServiceBus {
                name,
                queue,
                connection,
            } => json!({
                "type": "serviceBus", "direction": "out", "name": name,
                "queueName": queue, "connection": connection,
            }),
            OutputBinding::Http { name } => {
                json!({ "type": "http", "direction": "out", "name": name })
            }
        }
    }
}

/// One function of the app: its name (the folder name and the path the host posts to), its trigger
/// and its outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    pub name: String,
    pub trigger: Trigger,
    pub outputs: Vec<OutputBinding>,
}

impl FunctionSpec {
    pub fn new(name: &str, trigger: Trigger) -> Self {
        FunctionSpec {
            name: name.into(),
            trigger,
            outputs: Vec::new(),
        }
    }

    pub fn output(mut self, output: OutputBinding) -> Self {
        self.outputs.push(output);
        self
    }

    pub fn output_named(&self, name: &str) -> Option<&OutputBinding> {
        self.outputs.iter().find(|o| o.name() == name)
    }

    /// The `function.json` the Functions host reads for this function.
    pub fn function_json(&self) -> Value {
        let mut bindings = vec![self.trigger.binding()];
        bindings.extend(self.outputs.iter().map(OutputBinding::binding));
        json!({ "bindings": bindings })
    }

    /// Every queue this function reads or writes.
    pub fn queues(&self) -> Vec<&str> {
        let mut queues = Vec::new();
        if let Trigger::ServiceBus { queue, .. } = &self.trigger {
            queues.push(queue.as_str());
        }
        for output in &self.outputs {
            if let OutputBinding::ServiceBus { queue, .. } = output {
                queues.push(queue.as_str());
            }
        }
        queues
    }
}

/// Settings of `host.json` that belong to the app rather than to one function.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSettings {
    /// The executable the host starts, relative to the app root.
    pub executable: String,
    pub arguments: Vec<String>,
    /// `hh:mm:ss`.
    pub function_timeout: String,
    pub max_concurrent_calls: u32,
    pub max_auto_lock_renewal: String,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            executable: "vmbackup".into(),
            arguments: vec!["serve".into()],
            function_timeout: "00:10:00".into(),
            max_concurrent_calls: 16,
            max_auto_lock_renewal: "00:05:00".into(),
        }
    }
}

impl HostSettings {
    /// The app's `host.json`: custom handler, extension bundle 4.x, Service Bus extension 5.x settings.
    pub fn host_json(&self) -> Value {
        let mut service_bus = Map::new();
        service_bus.insert("autoCompleteMessages".into(), Value::Bool(true));
        service_bus.insert(
            "maxAutoLockRenewalDuration".into(),
            Value::String(self.max_auto_lock_renewal.clone()),
        );
        service_bus.insert(
            "maxConcurrentCalls".into(),
            Value::from(self.max_concurrent_calls),
        );
        json!({
            "version": "2.0",
            "logging": { "logLevel": { "default": "Information" } },
            "functionTimeout": self.function_timeout,
            "extensionBundle": {
                "id": "Microsoft.Azure.Functions.ExtensionBundle",
                "version": "[4.*, 5.0.0)"
            },
            "customHandler": {
                "description": {
                    "defaultExecutablePath": self.executable,
                    "workingDirectory": "",
                    "arguments": self.arguments,
                },
                "enableForwardingHttpRequest": false
            },
            "extensions": {
                "serviceBus": service_bus,
                "http": { "routePrefix": "api" }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_bus_function_json_names_queue_and_outputs() {
        let spec = FunctionSpec::new("assess-vm", Trigger::service_bus("protection-requests"))
            .output(OutputBinding::service_bus("ready", "protection-ready"));
        let json = spec.function_json();
        assert_eq!(json["bindings"][0]["type"], "serviceBusTrigger");
        assert_eq!(json["bindings"][0]["queueName"], "protection-requests");
        assert_eq!(json["bindings"][0]["connection"], "ServiceBusConnection");
        assert_eq!(json["bindings"][1]["direction"], "out");
        assert_eq!(json["bindings"][1]["queueName"], "protection-ready");
        assert_eq!(
            spec.queues(),
            vec!["protection-requests", "protection-ready"]
        );
    }

    #[test]
    fn timer_function_json_carries_run_on_startup_only_when_set() {
        let plain = FunctionSpec::new("sweep", Trigger::timer("%SWEEP_SCHEDULE%")).function_json();
        assert!(plain["bindings"][0].get("runOnStartup").is_none());
        let on_start = FunctionSpec::new(
            "sweep",
            Trigger::Timer {
                name: "timer".into(),
                schedule: "0 0 * * * *".into(),
                run_on_startup: true,
            },
        )
        .function_json();
        assert_eq!(on_start["bindings"][0]["runOnStartup"], true);
    }

    #[test]
    fn host_json_is_a_custom_handler_on_bundle_four() {
        let host = HostSettings::default().host_json();
        assert_eq!(host["version"], "2.0");
        assert_eq!(host["extensionBundle"]["version"], "[4.*, 5.0.0)");
        assert_eq!(
            host["customHandler"]["description"]["defaultExecutablePath"],
            "vmbackup"
        );
        assert_eq!(
            host["customHandler"]["description"]["arguments"][0],
            "serve"
        );
    }
}
