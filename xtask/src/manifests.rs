//! The Kubernetes manifests under `k8s/` (DESIGN §8): rendering every overlay, validating
//! the output offline, and checking that it cannot drift from the services' configuration.
//!
//! [`validate`] is what `cargo xtask test` (static checks) and `cargo xtask check-manifests`
//! run: `kubectl kustomize` of each overlay, the drift check, `kubernetes-validate --strict`
//! against [`KUBERNETES_VERSION`], then one checkov run over every rendered file and the
//! Dockerfile. checkov findings may be skipped only by `checkov.io/skip*` annotations whose
//! value names the check AND gives a reason ([`skip_problems`]).
//!
//! The drift check ([`drift_problems`]) knows what each service reads from two sources
//! that are themselves kept in step: README's configuration tables (names, defaults, which
//! are required) and the `ENV_*` string constants in each crate's sources. Every variable a
//! manifest sets must be one the service reads, every required one must be set, and probe
//! ports, container ports and Service names must match the services' listen defaults and
//! the gateway's upstream addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;
use serde_json::Value;

use crate::process::{run_captured, step};
use crate::{Interrupted, target_dir, tools, workspace_root};

/// The Kubernetes version the manifests are validated against: the newest whose schemas
/// the pinned kubernetes-validate bundles (1.37, current in late 2026). The manifests
/// need ≥ 1.30 (`preStop.sleep`).
pub const KUBERNETES_VERSION: &str = "1.37.0";

/// The services the manifests deploy (crate directory = binary = image = Service name).
pub const SERVICES: [&str; 3] = ["gateway-svc", "payment-svc", "ratelimit-svc"];

/// The gateway's upstream variables and the Service each must point at.
const UPSTREAMS: [(&str, &str); 2] = [
    ("PAYMENT_SVC_ADDR", "payment-svc"),
    ("RATELIMIT_SVC_ADDR", "ratelimit-svc"),
];

/// Renders, drift-checks and validates every overlay; see the module doc.
pub fn validate(interrupted: &Interrupted) -> anyhow::Result<()> {
    let started = Instant::now();
    let kubectl = tools::kubectl()?;
    let (kubernetes_validate, checkov) = tools::manifest_validators(interrupted)?;
    let knowledge = Knowledge::load(&workspace_root())?;

    let out_dir = target_dir().join("k8s-rendered");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut rendered = Vec::new();
    for (name, dir) in overlays()? {
        interrupted.check()?;
        println!("xtask: ── kubectl kustomize k8s/overlays/{name}");
        let text = render(&kubectl, &dir)?;
        let documents = parse_documents(&text)?;
        let mut problems = drift_problems(&name, &documents, &knowledge);
        problems.extend(skip_problems(&documents));
        if !problems.is_empty() {
            bail!(
                "k8s/overlays/{name} drifted from the services' configuration:\n  {}",
                problems.join("\n  ")
            );
        }
        let path = out_dir.join(format!("{name}.yaml"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        rendered.push(path);
    }

    let mut validate = Command::new(&kubernetes_validate);
    validate
        .args([
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
        ])
        .args(&rendered);
    step(
        &format!("kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION})"),
        validate,
        interrupted,
    )?;

    let dockerfile = workspace_root().join("Dockerfile");
    let dockerfile_text = std::fs::read_to_string(&dockerfile)
        .with_context(|| format!("reading {}", dockerfile.display()))?;
    let unexplained = dockerfile_skip_problems(&dockerfile_text);
    if !unexplained.is_empty() {
        bail!("Dockerfile: {}", unexplained.join("; "));
    }
    // One run over everything: checkov's start-up dominates its time.
    let mut scan = Command::new(&checkov);
    scan.args([
        "--framework",
        "kubernetes",
        "dockerfile",
        "--compact",
        "--quiet",
        "--skip-download",
    ]);
    for path in rendered.iter().chain([&dockerfile]) {
        scan.arg("--file").arg(path);
    }
    // Offline: no Prisma Cloud mapping download, no PyPI update check.
    scan.env("BC_SKIP_MAPPING", "TRUE")
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .env("ANSI_COLORS_DISABLED", "1");
    step(
        "checkov (rendered manifests and Dockerfile)",
        scan,
        interrupted,
    )?;

    println!(
        "xtask: manifests valid ({} overlays, {:.1}s)",
        rendered.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `k8s/overlays/*` directories holding a kustomization, by name.
pub fn overlays() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let dir = workspace_root().join("k8s/overlays");
    let mut overlays: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.join("kustomization.yaml").is_file())
        .filter_map(|path| Some((path.file_name()?.to_str()?.to_owned(), path)))
        .collect();
    overlays.sort();
    if overlays.is_empty() {
        bail!("no overlay under {}", dir.display());
    }
    Ok(overlays)
}

/// `kubectl kustomize <dir>`.
pub fn render(kubectl: &Path, dir: &Path) -> anyhow::Result<String> {
    let mut command = Command::new(kubectl);
    command.arg("kustomize").arg(dir);
    let output = run_captured(command, &format!("kubectl kustomize {}", dir.display()))?;
    String::from_utf8(output.stdout).context("kubectl kustomize printed non-UTF-8")
}

/// Every YAML document of a rendering.
pub fn parse_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    yaml_serde::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).context("parsing rendered YAML"))
        .filter(|value| !matches!(value, Ok(Value::Null)))
        .collect()
}

/// What must be set for a service to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// The variable, or one of the alternatives README names ("or `X`").
    Var {
        name: String,
        alternatives: Vec<String>,
    },
    /// Required unless `TLS_PLAINTEXT=true` (README: "required unless plaintext").
    UnlessPlaintext(String),
}

/// What one service reads, from README and its sources.
#[derive(Debug, Default)]
pub struct ServiceVars {
    /// Every variable the service reads.
    pub reads: BTreeSet<String>,
    /// The required ones.
    pub required: Vec<Requirement>,
    /// README's default of each single-variable row (backticked value only).
    pub defaults: BTreeMap<String, String>,
    /// The port of the crate's `DEFAULT_LISTEN_ADDR`.
    pub listen_port: u16,
}

/// What the drift check knows about every service.
#[derive(Debug)]
pub struct Knowledge {
    pub services: BTreeMap<String, ServiceVars>,
}

impl Knowledge {
    /// Reads README.md and the crates' sources under `root`. Fails when the two disagree
    /// (README names a variable no crate declares) or when a table is missing.
    pub fn load(root: &Path) -> anyhow::Result<Self> {
        let readme =
            std::fs::read_to_string(root.join("README.md")).context("reading README.md")?;
        let shared = env_constants(&root.join("service-kit/src"))?;
        let mut services = parse_readme(&readme);
        for service in SERVICES {
            let vars = services.entry(service.to_owned()).or_default();
            let own = env_constants(&root.join(service).join("src"))?;
            let undeclared: Vec<&String> = vars
                .reads
                .iter()
                .filter(|name| !own.contains(*name) && !shared.contains(*name))
                .collect();
            if !undeclared.is_empty() {
                bail!(
                    "README documents {undeclared:?} for {service}, but neither {service}/src \
                     nor service-kit/src declares them"
                );
            }
            if !vars.reads.contains("DATABASE_URL") && service == "payment-svc"
                || vars.required.is_empty() && service != "ratelimit-svc"
                || !vars.reads.contains("LISTEN_ADDR")
            {
                bail!("README's configuration tables for {service} did not parse");
            }
            vars.reads.extend(own);
            vars.listen_port = listen_port(&root.join(service).join("src/config.rs"))?;
        }
        Ok(Self { services })
    }
}

/// The per-service variables of README's `## Configuration` tables. A `###` heading names
/// the services its table is for ("Every service", or the service names it contains).
pub fn parse_readme(readme: &str) -> BTreeMap<String, ServiceVars> {
    let mut services: BTreeMap<String, ServiceVars> = BTreeMap::new();
    let mut in_configuration = false;
    let mut section: Vec<&str> = Vec::new();
    for line in readme.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            in_configuration = heading.trim() == "Configuration";
            section.clear();
            continue;
        }
        if !in_configuration {
            continue;
        }
        if let Some(heading) = line.strip_prefix("### ") {
            section = if heading.trim() == "Every service" {
                SERVICES.to_vec()
            } else {
                SERVICES
                    .into_iter()
                    .filter(|service| heading.contains(service))
                    .collect()
            };
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | names | default | meaning |  → ["", names, default, meaning, ""]
        if cells.len() < 5 || !cells[1].starts_with('`') {
            continue;
        }
        let names = backticked_names(cells[1]);
        let default = cells[2];
        let meaning = cells[3];
        let alternatives: Vec<String> = meaning
            .match_indices("or `")
            .filter_map(|(at, _)| backticked_names(&meaning[at + 3..]).into_iter().next())
            .collect();
        for service in &section {
            let vars = services.entry((*service).to_owned()).or_default();
            vars.reads.extend(names.iter().cloned());
            vars.reads.extend(alternatives.iter().cloned());
            if let [name] = names.as_slice()
                && let Some(value) = default
                    .strip_prefix('`')
                    .and_then(|rest| rest.split('`').next())
            {
                vars.defaults.insert(name.clone(), value.to_owned());
            }
            if default.starts_with("required") {
                for name in &names {
                    vars.required.push(if default.contains("unless plaintext") {
                        Requirement::UnlessPlaintext(name.clone())
                    } else {
                        Requirement::Var {
                            name: name.clone(),
                            alternatives: alternatives.clone(),
                        }
                    });
                }
            }
        }
    }
    services
}

/// The `UPPER_SNAKE` names in backticks in `text`.
fn backticked_names(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| is_env_name(word))
        .map(str::to_owned)
        .collect()
}

fn is_env_name(word: &str) -> bool {
    word.len() > 2
        && word.starts_with(|c: char| c.is_ascii_uppercase())
        && word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The values of `const ENV_…: &str = "NAME";` in every `.rs` file under `dir`.
fn env_constants(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = std::fs::read_to_string(&path)?;
                names.extend(
                    text.lines()
                        .filter(|line| line.contains("const ENV_") && line.contains("&str"))
                        .filter_map(|line| line.split('"').nth(1))
                        .filter(|name| is_env_name(name))
                        .map(str::to_owned),
                );
            }
        }
    }
    Ok(names)
}

/// The port of `DEFAULT_LISTEN_ADDR` in a crate's config.rs.
fn listen_port(config_rs: &Path) -> anyhow::Result<u16> {
    let text = std::fs::read_to_string(config_rs)
        .with_context(|| format!("reading {}", config_rs.display()))?;
    text.lines()
        .find(|line| line.contains("const DEFAULT_LISTEN_ADDR"))
        .and_then(|line| line.split('"').nth(1))
        .and_then(|addr| addr.rsplit(':').next()?.parse().ok())
        .with_context(|| format!("no DEFAULT_LISTEN_ADDR in {}", config_rs.display()))
}

/// One service container of a rendered workload.
struct Container<'a> {
    /// `Deployment/payment-svc`.
    workload: String,
    kind: &'a str,
    service: &'static str,
    pod_spec: &'a Value,
    container: &'a Value,
    /// Every variable set, with its value when the manifest holds it in clear
    /// (`env[].value`, ConfigMap data); Secret values are not read.
    env: BTreeMap<String, Option<String>>,
}

/// Every way the rendering of overlay `overlay` disagrees with the services' code.
pub fn drift_problems(overlay: &str, documents: &[Value], knowledge: &Knowledge) -> Vec<String> {
    let mut problems = Vec::new();
    let containers = service_containers(documents, &mut problems);
    for service in SERVICES {
        if !containers
            .iter()
            .any(|c| c.service == service && c.kind == "Deployment")
        {
            problems.push(format!("no Deployment runs {service}"));
        }
    }
    if !containers
        .iter()
        .any(|c| c.service == "payment-svc" && c.kind == "Job" && args(c.container) == ["migrate"])
    {
        problems.push("no Job runs `payment-svc migrate`".to_owned());
    }

    for c in &containers {
        let Some(vars) = knowledge.services.get(c.service) else {
            continue;
        };
        let at = format!("{} ({})", c.workload, c.service);
        for name in c.env.keys() {
            if !vars.reads.contains(name) && !name.starts_with("OTEL_") {
                problems.push(format!(
                    "{at} sets {name}, which {} does not read",
                    c.service
                ));
            }
        }
        if c.env.contains_key("PAYSUITE_FAILPOINT") {
            problems.push(format!("{at} sets PAYSUITE_FAILPOINT (tests only)"));
        }
        let plaintext = c
            .env
            .get("TLS_PLAINTEXT")
            .is_some_and(|v| v.as_deref() == Some("true"));
        for requirement in &vars.required {
            match requirement {
                Requirement::Var { name, alternatives } => {
                    if !c.env.contains_key(name)
                        && !alternatives.iter().any(|a| c.env.contains_key(a))
                    {
                        problems.push(format!("{at} does not set {name}, which is required"));
                    }
                }
                Requirement::UnlessPlaintext(name) => {
                    if plaintext && c.env.contains_key(name) {
                        problems.push(format!("{at} sets both TLS_PLAINTEXT=true and {name}"));
                    } else if !plaintext && !c.env.contains_key(name) {
                        problems.push(format!("{at} sets neither {name} nor TLS_PLAINTEXT=true"));
                    }
                }
            }
        }
        if c.kind == "Deployment" {
            check_serving(c, vars, &at, &mut problems);
        }
        if c.service == "payment-svc"
            && c.kind == "Deployment"
            && c.env.get("MIGRATE_ON_START") != Some(&Some("false".to_owned()))
        {
            problems.push(format!(
                "{at} must set MIGRATE_ON_START=false (the Job migrates)"
            ));
        }
        if c.service == "gateway-svc" {
            check_upstreams(c, documents, knowledge, &at, &mut problems);
        }
        if overlay == "prod" {
            if plaintext {
                problems.push(format!("{at}: prod serves TLS, not TLS_PLAINTEXT"));
            }
            if c.service == "ratelimit-svc"
                && c.env.get("REDIS_CLUSTER") != Some(&Some("true".to_owned()))
            {
                problems.push(format!(
                    "{at}: prod runs on a Redis Cluster (REDIS_CLUSTER=true)"
                ));
            }
        }
    }
    if overlay == "prod" {
        for doc in documents {
            let (kind, name) = (str_at(doc, "/kind"), str_at(doc, "/metadata/name"));
            let replicas = match kind {
                "Deployment" => doc.pointer("/spec/replicas").and_then(Value::as_u64),
                "HorizontalPodAutoscaler" => {
                    doc.pointer("/spec/minReplicas").and_then(Value::as_u64)
                }
                _ => continue,
            };
            if replicas.unwrap_or(1) < 2 {
                problems.push(format!("{kind}/{name}: prod runs at least 2 replicas"));
            }
        }
    }
    problems
}

/// Ports, probes, shutdown timing and the Service of a serving container.
fn check_serving(c: &Container<'_>, vars: &ServiceVars, at: &str, problems: &mut Vec<String>) {
    let port = match c.env.get("LISTEN_ADDR") {
        Some(Some(addr)) => addr.rsplit(':').next().and_then(|p| p.parse().ok()),
        Some(None) => None,
        None => Some(vars.listen_port),
    };
    let Some(port) = port else {
        problems.push(format!("{at}: LISTEN_ADDR has no port in clear"));
        return;
    };
    if port != vars.listen_port {
        problems.push(format!(
            "{at} listens on {port}, not the service's default {}",
            vars.listen_port
        ));
    }
    let grpc_port = c.container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "grpc")
        .and_then(|p| p["containerPort"].as_u64());
    if grpc_port != Some(u64::from(port)) {
        problems.push(format!(
            "{at}: container port `grpc` is {grpc_port:?}, the service listens on {port}"
        ));
    }
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let grpc = &c.container[probe]["grpc"];
        if grpc["port"].as_u64() != Some(u64::from(port)) {
            problems.push(format!("{at}: {probe} is not a gRPC probe on port {port}"));
        }
    }
    if c.container["readinessProbe"]["grpc"]["service"] != "readiness" {
        problems.push(format!(
            "{at}: readinessProbe must ask for the `readiness` health service"
        ));
    }
    // SIGTERM comes after preStop; then the drain; the grace period must cover both.
    let drain = c
        .env
        .get("SHUTDOWN_DRAIN_TIMEOUT")
        .cloned()
        .flatten()
        .or_else(|| vars.defaults.get("SHUTDOWN_DRAIN_TIMEOUT").cloned())
        .and_then(|text| humantime::parse_duration(&text).ok());
    let pre_stop = c.container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64();
    let grace = c.pod_spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    match (drain, pre_stop) {
        (Some(drain), Some(pre_stop)) => {
            if Duration::from_secs(grace) <= drain + Duration::from_secs(pre_stop) {
                problems.push(format!(
                    "{at}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + drain {drain:?}"
                ));
            }
        }
        (None, _) => problems.push(format!("{at}: SHUTDOWN_DRAIN_TIMEOUT is unknown")),
        (_, None) => problems.push(format!("{at}: no preStop sleep")),
    }
}

/// The gateway's upstream addresses name the Services and their ports.
fn check_upstreams(
    c: &Container<'_>,
    documents: &[Value],
    knowledge: &Knowledge,
    at: &str,
    problems: &mut Vec<String>,
) {
    for (variable, service) in UPSTREAMS {
        let Some(Some(list)) = c.env.get(variable) else {
            problems.push(format!(
                "{at} must set {variable} in clear to the {service} Service"
            ));
            continue;
        };
        let port = knowledge
            .services
            .get(service)
            .map_or(0, |vars| vars.listen_port);
        for endpoint in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let authority = endpoint.split("://").nth(1).unwrap_or(endpoint);
            let (host, endpoint_port) = authority.rsplit_once(':').unwrap_or((authority, ""));
            let host = host.split('.').next().unwrap_or(host);
            if host != service || endpoint_port != port.to_string() {
                problems.push(format!(
                    "{at}: {variable} endpoint {endpoint} is not the {service} Service on {port}"
                ));
            }
        }
    }
    // And those Services exist, select their pods and expose the port (headless, so the
    // gateway sees every pod).
    for service in SERVICES {
        let port = knowledge
            .services
            .get(service)
            .map_or(0, |vars| vars.listen_port);
        let found = documents.iter().find(|doc| {
            str_at(doc, "/kind") == "Service" && str_at(doc, "/metadata/name") == service
        });
        let Some(found) = found else {
            problems.push(format!("no Service named {service}"));
            continue;
        };
        if found["spec"]["selector"]["app.kubernetes.io/name"] != service {
            problems.push(format!(
                "Service/{service} does not select app.kubernetes.io/name={service}"
            ));
        }
        let exposes = found["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["port"].as_u64() == Some(u64::from(port))
                    && (p["targetPort"] == "grpc"
                        || p["targetPort"].as_u64() == Some(u64::from(port)))
            });
        if !exposes {
            problems.push(format!(
                "Service/{service} does not expose port {port} to the `grpc` port"
            ));
        }
        let headless = found["spec"]["clusterIP"] == "None";
        if headless != (service != "gateway-svc") {
            problems.push(format!(
                "Service/{service} must be {}",
                if service == "gateway-svc" {
                    "a regular Service"
                } else {
                    "headless (clusterIP: None)"
                }
            ));
        }
    }
}

/// Every container running one of [`SERVICES`]' images, with its environment resolved.
fn service_containers<'a>(
    documents: &'a [Value],
    problems: &mut Vec<String>,
) -> Vec<Container<'a>> {
    let mut found = Vec::new();
    for doc in documents {
        let kind = str_at(doc, "/kind");
        let pod_spec = match kind {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" => {
                doc.pointer("/spec/template/spec")
            }
            "CronJob" => doc.pointer("/spec/jobTemplate/spec/template/spec"),
            "Pod" => doc.pointer("/spec"),
            _ => None,
        };
        let Some(pod_spec) = pod_spec else { continue };
        let workload = format!("{kind}/{}", str_at(doc, "/metadata/name"));
        let all = ["initContainers", "containers"]
            .into_iter()
            .filter_map(|key| pod_spec[key].as_array())
            .flatten();
        for container in all {
            let image = container["image"].as_str().unwrap_or_default();
            let repository = image.split(['@', ':']).next().unwrap_or(image);
            let Some(service) = SERVICES
                .into_iter()
                .find(|service| repository.rsplit('/').next() == Some(*service))
            else {
                continue;
            };
            let mut env = BTreeMap::new();
            for source in container["envFrom"].as_array().into_iter().flatten() {
                let prefix = source["prefix"].as_str().unwrap_or_default();
                let (kind, reference) = if source["configMapRef"].is_object() {
                    ("ConfigMap", &source["configMapRef"])
                } else {
                    ("Secret", &source["secretRef"])
                };
                let name = reference["name"].as_str().unwrap_or_default();
                let object = documents
                    .iter()
                    .find(|d| str_at(d, "/kind") == kind && str_at(d, "/metadata/name") == name);
                let Some(object) = object else {
                    problems.push(format!(
                        "{workload}: envFrom names {kind}/{name}, which is not rendered"
                    ));
                    continue;
                };
                for key in ["data", "stringData"] {
                    for (var, value) in object[key].as_object().into_iter().flatten() {
                        let clear = (kind == "ConfigMap")
                            .then(|| value.as_str().map(str::to_owned))
                            .flatten();
                        env.insert(format!("{prefix}{var}"), clear);
                    }
                }
            }
            for var in container["env"].as_array().into_iter().flatten() {
                if let Some(name) = var["name"].as_str() {
                    env.insert(name.to_owned(), var["value"].as_str().map(str::to_owned));
                }
            }
            found.push(Container {
                workload: workload.clone(),
                kind,
                service,
                pod_spec,
                container,
                env,
            });
        }
    }
    found
}

fn args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `checkov.io/skip*` annotations that do not say `CKV_…=<reason>`: a skip must explain
/// itself.
pub fn skip_problems(documents: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    for doc in documents {
        let at = format!("{}/{}", str_at(doc, "/kind"), str_at(doc, "/metadata/name"));
        for pointer in [
            "/metadata/annotations",
            "/spec/template/metadata/annotations",
        ] {
            let annotations = doc.pointer(pointer).and_then(Value::as_object);
            for (key, value) in annotations.into_iter().flatten() {
                if !key.starts_with("checkov.io/skip") {
                    continue;
                }
                let value = value.as_str().unwrap_or_default();
                let explained = value.split_once('=').is_some_and(|(check, reason)| {
                    check.starts_with("CKV") && reason.trim().len() >= 10
                });
                if !explained {
                    problems.push(format!(
                        "{at}: {key} must read `CKV_…=<reason>`, not {value:?}"
                    ));
                }
            }
        }
    }
    problems
}

/// Inline `checkov:skip=` comments in the Dockerfile without a reason.
fn dockerfile_skip_problems(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.split_once("checkov:skip=").map(|(_, rest)| rest))
        .filter(|rest| {
            rest.split_once(':')
                .is_none_or(|(_, reason)| reason.trim().len() < 10)
        })
        .map(|rest| format!("`checkov:skip={rest}` gives no reason"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(overlay: &str) -> anyhow::Result<Vec<Value>> {
        let kubectl = tools::kubectl()?;
        let dir = workspace_root().join("k8s/overlays").join(overlay);
        parse_documents(&render(&kubectl, &dir)?)
    }

    fn knowledge() -> anyhow::Result<Knowledge> {
        Knowledge::load(&workspace_root())
    }

    #[test]
    fn manifests_readme_tables_parse() -> anyhow::Result<()> {
        let knowledge = knowledge()?;
        let payment = &knowledge.services["payment-svc"];
        assert_eq!(payment.listen_port, 50052);
        assert!(payment.reads.contains("MIGRATE_ON_START"));
        assert!(
            payment.required.iter().any(
                |r| matches!(r, Requirement::Var { name, .. } if name == "CARD_FINGERPRINT_KEY")
            )
        );
        assert_eq!(
            payment
                .defaults
                .get("SHUTDOWN_DRAIN_TIMEOUT")
                .map(String::as_str),
            Some("20s")
        );
        let gateway = &knowledge.services["gateway-svc"];
        assert!(gateway.required.contains(&Requirement::Var {
            name: "IDENTITY_SIGNING_KEY".to_owned(),
            alternatives: vec!["IDENTITY_SIGNING_KEY_FILE".to_owned()],
        }));
        assert!(
            gateway
                .required
                .contains(&Requirement::UnlessPlaintext("TLS_KEY_FILE".to_owned()))
        );
        assert!(!gateway.reads.contains("DATABASE_URL"));
        assert!(
            knowledge.services["ratelimit-svc"]
                .reads
                .contains("REDIS_CLUSTER")
        );
        Ok(())
    }

    #[test]
    fn manifests_match_service_config() -> anyhow::Result<()> {
        let knowledge = knowledge()?;
        let names: Vec<String> = overlays()?.into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["dev", "prod"]);
        for overlay in names {
            let documents = rendered(&overlay)?;
            let mut problems = drift_problems(&overlay, &documents, &knowledge);
            problems.extend(skip_problems(&documents));
            assert!(
                problems.is_empty(),
                "k8s/overlays/{overlay}:\n{}",
                problems.join("\n")
            );
        }
        Ok(())
    }

    /// The check is not vacuous: a variable no service reads, a missing required one, a
    /// probe on the wrong port and a Service renamed are each reported.
    #[test]
    fn manifests_drift_is_caught() -> anyhow::Result<()> {
        let knowledge = knowledge()?;
        let mut documents = rendered("dev")?;
        for doc in &mut documents {
            match (str_at(doc, "/kind"), str_at(doc, "/metadata/name")) {
                ("Deployment", "payment-svc") => {
                    let container = &mut doc["spec"]["template"]["spec"]["containers"][0];
                    container["env"]
                        .as_array_mut()
                        .context("payment-svc has env")?
                        .push(serde_json::json!({"name": "PAYMENT_SVC_BOGUS", "value": "1"}));
                    container["readinessProbe"]["grpc"]["port"] = 50099.into();
                }
                ("Deployment", "gateway-svc") => {
                    doc["spec"]["template"]["spec"]["containers"][0]["envFrom"]
                        .as_array_mut()
                        .context("gateway-svc has envFrom")?
                        .retain(|source| source["secretRef"].is_null());
                }
                ("Service", "ratelimit-svc") => doc["metadata"]["name"] = "ratelimit".into(),
                ("Deployment", "ratelimit-svc") => {
                    doc["metadata"]["annotations"]["checkov.io/skip9"] = "CKV_K8S_1".into();
                }
                _ => {}
            }
        }
        let mut problems = drift_problems("dev", &documents, &knowledge);
        problems.extend(skip_problems(&documents));
        let text = problems.join("\n");
        for expected in [
            "sets PAYMENT_SVC_BOGUS, which payment-svc does not read",
            "readinessProbe is not a gRPC probe on port 50052",
            "does not set API_KEY_PEPPER, which is required",
            "no Service named ratelimit-svc",
            "checkov.io/skip9 must read",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} not reported in:\n{text}"
            );
        }
        Ok(())
    }

    #[test]
    fn manifests_dockerfile_skips_need_reasons() {
        assert_eq!(
            dockerfile_skip_problems("# checkov:skip=CKV_DOCKER_2").len(),
            1
        );
        assert!(
            dockerfile_skip_problems("# checkov:skip=CKV_DOCKER_2: the kubelet probes over gRPC")
                .is_empty()
        );
    }
}
