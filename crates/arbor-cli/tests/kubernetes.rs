//! `deploy/kubernetes`: every manifest parses into its Kubernetes API type
//! (k8s-openapi) with no field the type does not know (a typo fails), and
//! the pieces agree with each other and with the `arbor` binary: Services
//! select their pods on the ports the containers listen on, every Secret,
//! key, ConfigMap and claim a pod uses exists, every file a container is
//! told to read is mounted, the container arguments parse, and the env
//! server's backend names the node Service. No cluster needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use arbor_rollout::backend::BackendSpec;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodSpec, Secret, Service,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

mod common;
use common::arbor;

const NAMESPACE: &str = "arbor";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// Every object of the deployment, by kind and name.
#[derive(Default)]
struct Manifests {
    namespaces: BTreeMap<String, Namespace>,
    secrets: BTreeMap<String, Secret>,
    config_maps: BTreeMap<String, ConfigMap>,
    claims: BTreeMap<String, PersistentVolumeClaim>,
    services: BTreeMap<String, Service>,
    daemon_sets: BTreeMap<String, DaemonSet>,
    deployments: BTreeMap<String, Deployment>,
}

/// Keys present in `original` but missing from `reserialized`, as paths: the fields the
/// typed object dropped because its type has no such field.
fn dropped_keys(original: &Value, reserialized: &Value, at: &str, out: &mut Vec<String>) {
    match (original, reserialized) {
        (Value::Object(o), Value::Object(r)) => {
            for (k, v) in o {
                match r.get(k) {
                    Some(rv) => dropped_keys(v, rv, &format!("{at}.{k}"), out),
                    None => out.push(format!("{at}.{k}")),
                }
            }
        }
        (Value::Array(o), Value::Array(r)) => {
            for (i, (v, rv)) in o.iter().zip(r).enumerate() {
                dropped_keys(v, rv, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The document as `T`, refusing any key `T` does not have.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value, file: &str) -> Result<T, String> {
    let t: T = serde_json::from_value(doc.clone()).map_err(|e| format!("{file}: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{file}: {e}"))?;
    let mut dropped = Vec::new();
    dropped_keys(doc, &back, "", &mut dropped);
    if dropped.is_empty() {
        Ok(t)
    } else {
        Err(format!("{file}: unknown fields {dropped:?}"))
    }
}

/// Every YAML document of a file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("manifest");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn insert<T>(map: &mut BTreeMap<String, T>, doc: &Value, file: &str, t: T) {
    let name = doc["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_string();
    assert!(
        map.insert(name.clone(), t).is_none(),
        "{file}: {name} twice"
    );
}

impl Manifests {
    fn add(&mut self, doc: &Value, file: &str) -> Result<(), String> {
        let kind = doc["kind"].as_str().unwrap_or_default();
        match kind {
            "Namespace" => insert(&mut self.namespaces, doc, file, typed(doc, file)?),
            "Secret" => insert(&mut self.secrets, doc, file, typed(doc, file)?),
            "ConfigMap" => insert(&mut self.config_maps, doc, file, typed(doc, file)?),
            "PersistentVolumeClaim" => insert(&mut self.claims, doc, file, typed(doc, file)?),
            "Service" => insert(&mut self.services, doc, file, typed(doc, file)?),
            "DaemonSet" => insert(&mut self.daemon_sets, doc, file, typed(doc, file)?),
            "Deployment" => insert(&mut self.deployments, doc, file, typed(doc, file)?),
            other => return Err(format!("{file}: unexpected kind {other:?}")),
        }
        if kind != "Namespace" {
            let ns = doc["metadata"]["namespace"].as_str();
            if ns != Some(NAMESPACE) {
                return Err(format!("{file}: {kind} in namespace {ns:?}"));
            }
        }
        Ok(())
    }
}

/// The files kustomization.yaml lists, which must be every other YAML file of the folder.
fn resources() -> Vec<String> {
    let k = &documents(&deploy_dir().join("kustomization.yaml"))[0];
    assert_eq!(k["namespace"], NAMESPACE);
    let listed: Vec<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file").to_string())
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, present, "kustomization.yaml lists every manifest");
    listed
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    for file in resources() {
        for doc in documents(&deploy_dir().join(&file)) {
            m.add(&doc, &file).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    m
}

fn pod<'a>(m: &'a Manifests, workload: &str) -> &'a PodSpec {
    let template = match m.daemon_sets.get(workload) {
        Some(d) => &d.spec.as_ref().expect("spec").template,
        None => {
            &m.deployments[workload]
                .spec
                .as_ref()
                .expect("spec")
                .template
        }
    };
    template.spec.as_ref().expect("pod spec")
}

fn pod_labels<'a>(m: &'a Manifests, workload: &str) -> &'a BTreeMap<String, String> {
    let template = match m.daemon_sets.get(workload) {
        Some(d) => &d.spec.as_ref().expect("spec").template,
        None => {
            &m.deployments[workload]
                .spec
                .as_ref()
                .expect("spec")
                .template
        }
    };
    let meta = template.metadata.as_ref().expect("template metadata");
    meta.labels.as_ref().expect("pod labels")
}

/// The `arbor` arguments a container runs: its `args` when the command is `arbor` itself or
/// a shell that ends in `exec arbor "$@"` (with `$0` = arbor).
fn arbor_args(c: &Container) -> Vec<String> {
    let command = c.command.clone().unwrap_or_default();
    let direct = command == ["arbor"];
    let wrapped = command.len() == 4
        && command[..2] == ["/bin/sh", "-c"]
        && command[2].trim_end().ends_with("exec arbor \"$@\"")
        && command[3] == "arbor";
    assert!(direct || wrapped, "{}: command {command:?}", c.name);
    c.args.clone().expect("args")
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

fn port_of(args: &[String]) -> i32 {
    let listen = flag(args, "--listen").expect("--listen");
    listen
        .rsplit_once(':')
        .expect("HOST:PORT")
        .1
        .parse()
        .expect("port")
}

/// Where a file a container reads comes from: the volume mounted above it, and for Secret and
/// ConfigMap volumes the key that becomes the file, which must exist.
fn source_of(m: &Manifests, pod: &PodSpec, c: &Container, file: &str) -> String {
    let mounts = c.volume_mounts.as_ref().expect("mounts");
    let mount = mounts
        .iter()
        .find(|vm| Path::new(file).starts_with(&vm.mount_path))
        .unwrap_or_else(|| panic!("{}: nothing is mounted above {file}", c.name));
    let rel = Path::new(file)
        .strip_prefix(&mount.mount_path)
        .expect("inside");
    let rel = rel.to_str().expect("utf-8");
    let volumes = pod.volumes.as_ref().expect("volumes");
    let v = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: no volume {}", c.name, mount.name));
    // A file under a volume with `items` is the item whose path it is; else the key itself.
    let key = |items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| match items {
        Some(items) => items
            .iter()
            .find(|i| i.path == rel)
            .map(|i| i.key.clone())
            .unwrap_or_else(|| panic!("{file}: no item at {rel}")),
        None => rel.to_string(),
    };
    if let Some(s) = &v.secret {
        let name = s.secret_name.as_deref().expect("secretName");
        let k = key(&s.items);
        let secret = m
            .secrets
            .get(name)
            .unwrap_or_else(|| panic!("no Secret {name}"));
        let has = secret
            .string_data
            .as_ref()
            .is_some_and(|d| d.contains_key(&k))
            || secret.data.as_ref().is_some_and(|d| d.contains_key(&k));
        assert!(has, "Secret {name} has no key {k} (for {file})");
        format!("secret:{name}/{k}")
    } else if let Some(cm) = &v.config_map {
        let k = key(&cm.items);
        let map = &m.config_maps[&cm.name];
        assert!(
            map.data.as_ref().is_some_and(|d| d.contains_key(&k)),
            "ConfigMap {} has no key {k}",
            cm.name
        );
        format!("configmap:{}/{k}", cm.name)
    } else if let Some(claim) = &v.persistent_volume_claim {
        assert!(
            m.claims.contains_key(&claim.claim_name),
            "no claim {}",
            claim.claim_name
        );
        format!("claim:{}", claim.claim_name)
    } else if let Some(h) = &v.host_path {
        format!("host:{}", h.path)
    } else {
        panic!("{file}: volume {} of an unexpected kind", v.name)
    }
}

fn seconds(args: &[String], name: &str) -> f64 {
    flag(args, name).expect(name).parse().expect("seconds")
}

#[test]
fn every_manifest_is_a_known_kubernetes_object_without_unknown_fields() {
    let m = load();
    assert!(m.namespaces.contains_key(NAMESPACE));
    assert_eq!(m.daemon_sets.len(), 1);
    assert_eq!(m.deployments.len(), 1);
    // The check itself catches a misspelt field.
    let text = std::fs::read_to_string(deploy_dir().join("node-daemonset.yaml")).expect("yaml");
    let typo = text.replacen(
        "terminationGracePeriodSeconds",
        "terminationGracePeriodSecond",
        1,
    );
    let doc = Value::deserialize(serde_yaml_ng::Deserializer::from_str(&typo)).expect("yaml");
    let e = typed::<DaemonSet>(&doc, "typo").expect_err("refused");
    assert!(e.contains("terminationGracePeriodSecond"), "{e}");
}

#[test]
fn services_select_their_pods_on_the_ports_they_listen_on() {
    let m = load();
    for (service, workload, headless) in [
        ("arbor-node", "arbor-node", true),
        ("arbor-serve", "arbor-serve", false),
    ] {
        let spec = m.services[service].spec.as_ref().expect("spec");
        assert_eq!(
            spec.cluster_ip.as_deref() == Some("None"),
            headless,
            "{service}"
        );
        let labels = pod_labels(&m, workload);
        let selector = spec.selector.as_ref().expect("selector");
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{service}"
        );
        let pod = pod(&m, workload);
        let c = &pod.containers[0];
        let listen = port_of(&arbor_args(c));
        let ports = c.ports.as_ref().expect("ports");
        let cport = ports
            .iter()
            .find(|p| p.container_port == listen)
            .expect("port");
        let sport = &spec.ports.as_ref().expect("ports")[0];
        assert_eq!(sport.port, listen, "{service}");
        let target = sport.target_port.as_ref().expect("targetPort");
        assert_eq!(
            *target,
            IntOrString::String(cport.name.clone().expect("name"))
        );
        // The workload's own selector picks its pods.
        let matching = match m.daemon_sets.get(workload) {
            Some(d) => d.spec.as_ref().expect("spec").selector.match_labels.clone(),
            None => m.deployments[workload]
                .spec
                .as_ref()
                .expect("spec")
                .selector
                .match_labels
                .clone(),
        };
        assert!(
            matching
                .expect("matchLabels")
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        );
        // Probes ask the unauthenticated health route on that port.
        for probe in [&c.readiness_probe, &c.liveness_probe] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("httpGet");
            assert_eq!(get.path.as_deref(), Some("/health"));
            assert_eq!(get.port, *target);
            let tls = flag(&arbor_args(c), "--tls-cert").is_some();
            assert_eq!(
                get.scheme.as_deref() == Some("HTTPS"),
                tls,
                "{service}: probe scheme"
            );
        }
    }
}

#[test]
fn every_file_a_container_reads_is_mounted_from_an_existing_source() {
    let m = load();
    let node = pod(&m, "arbor-node");
    let c = &node.containers[0];
    let a = arbor_args(c);
    let token = source_of(&m, node, c, flag(&a, "--token-file").expect("token"));
    assert_eq!(token, "secret:arbor-node-token/token");
    let cert = source_of(&m, node, c, flag(&a, "--tls-cert").expect("cert"));
    assert_eq!(cert, "secret:arbor-node-tls/tls.crt");
    assert_eq!(
        source_of(&m, node, c, flag(&a, "--tls-key").expect("key")),
        "secret:arbor-node-tls/tls.key"
    );
    let images = source_of(&m, node, c, flag(&a, "--image-root").expect("images"));
    assert_eq!(
        images, "host:/var/lib/arbor",
        "the image store outlives the pod"
    );

    let serve = pod(&m, "arbor-serve");
    let c = &serve.containers[0];
    let a = arbor_args(c);
    let own = source_of(&m, serve, c, flag(&a, "--token-file").expect("token"));
    assert_eq!(
        own, "secret:arbor-serve-token/token",
        "not the nodes' token"
    );
    assert_eq!(
        source_of(&m, serve, c, flag(&a, "--root").expect("root")),
        "claim:arbor-serve-runs"
    );
    let allow = flag(&a, "--allow-dir").expect("allow-dir");
    assert_eq!(source_of(&m, serve, c, allow), "claim:arbor-datasets");
    let backend = source_of(&m, serve, c, flag(&a, "--backend-file").expect("backend"));
    assert_eq!(backend, "configmap:arbor-serve-config/backend.toml");
}

#[test]
fn the_env_server_reaches_every_node_through_the_headless_service() {
    let m = load();
    let text = &m.config_maps["arbor-serve-config"]
        .data
        .as_ref()
        .expect("data")["backend.toml"];
    let BackendSpec::Cluster(c) = toml::from_str::<BackendSpec>(text).expect("backend table")
    else {
        panic!("a cluster backend");
    };
    c.validate().expect("valid");
    let node_port = port_of(&arbor_args(&pod(&m, "arbor-node").containers[0]));
    assert_eq!(
        c.nodes,
        [format!(
            "dns:arbor-node.{NAMESPACE}.svc.cluster.local:{node_port}"
        )]
    );
    assert!(m.services.contains_key("arbor-node"));
    let serve = pod(&m, "arbor-serve");
    let sc = &serve.containers[0];
    let token = c
        .token_file
        .as_ref()
        .expect("token_file")
        .to_str()
        .expect("utf-8");
    // The same token the nodes check, and the CA of the nodes' certificate.
    assert_eq!(
        source_of(&m, serve, sc, token),
        "secret:arbor-node-token/token"
    );
    let ca =
        c.ca.as_ref()
            .expect("ca: TLS to the nodes")
            .to_str()
            .expect("utf-8");
    assert_eq!(source_of(&m, serve, sc, ca), "secret:arbor-node-tls/ca.crt");
    // The env server holds no node private key.
    let mounts_key = serve.volumes.iter().flatten().any(|v| {
        v.secret.as_ref().is_some_and(|s| {
            s.secret_name.as_deref() == Some("arbor-node-tls")
                && s.items
                    .as_ref()
                    .is_none_or(|i| i.iter().any(|k| k.key == "tls.key"))
        })
    });
    assert!(!mounts_key);
}

#[test]
fn node_pods_are_privileged_sized_and_outlive_their_drain() {
    let m = load();
    let node = pod(&m, "arbor-node");
    let c = &node.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(
        sc.privileged,
        Some(true),
        "namespaces, mounts and cgroups need it"
    );
    let r = c.resources.as_ref().expect("resources");
    for (what, q) in [("requests", &r.requests), ("limits", &r.limits)] {
        let q = q.as_ref().unwrap_or_else(|| panic!("{what}"));
        assert!(q.contains_key("cpu") && q.contains_key("memory"), "{what}");
    }
    let a = arbor_args(c);
    let grace = node.termination_grace_period_seconds.expect("grace period") as f64;
    assert!(
        grace > seconds(&a, "--drain-grace-s") + 10.0,
        "room to destroy what is left"
    );
    // The env server runs no sandbox: no privileges.
    let serve = &pod(&m, "arbor-serve").containers[0];
    let ssc = serve.security_context.as_ref().expect("securityContext");
    assert_ne!(ssc.privileged, Some(true));
    assert_eq!(ssc.allow_privilege_escalation, Some(false));
}

/// Runs `arbor ARGS`, killed after a while if it does not stop on its own.
fn run_arbor(args: &[String]) -> (Option<i32>, String) {
    let mut child = arbor()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("arbor");
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let o = child.wait_with_output().expect("output");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn container_args_are_accepted_by_the_arbor_binary() {
    let m = load();
    for workload in ["arbor-node", "arbor-serve"] {
        let a = arbor_args(&pod(&m, workload).containers[0]);
        // The subcommand: the words before the first flag.
        let sub: Vec<String> = a
            .iter()
            .take_while(|w| !w.starts_with('-'))
            .cloned()
            .collect();
        let help = arbor().args(&sub).arg("--help").output().expect("help");
        let help = String::from_utf8_lossy(&help.stdout);
        for f in a.iter().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(f.as_str()),
                "`arbor {}` has no {f}",
                sub.join(" ")
            );
        }
        // The real parse: every value is accepted (clap exits 2 otherwise), and the command
        // gets as far as reading its token file, which is not on this machine.
        let (code, err) = run_arbor(&a);
        assert_eq!(code, Some(1), "{workload}: {err}");
        assert!(
            err.contains("reading the token file /var/run/arbor/"),
            "{workload}: {err}"
        );
    }
}
