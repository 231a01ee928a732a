//! Static checks of the Helm chart: CRDs identical to the generated ones, least-privilege RBAC,
//! documented values, and the security settings of the workloads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("charts/weft")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn chart_crds_are_identical_to_the_generated_ones() {
    let generated = root().join("crds/generated");
    let mut names: Vec<_> = std::fs::read_dir(&generated)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(!names.is_empty());
    for name in &names {
        let a = read(&generated.join(name));
        let b = std::fs::read_to_string(chart().join("crds").join(name)).unwrap_or_default();
        assert!(
            a == b,
            "charts/weft/crds/{} differs from crds/generated: run `make generate`",
            name.to_string_lossy()
        );
    }
    let in_chart = std::fs::read_dir(chart().join("crds")).unwrap().count();
    assert_eq!(
        in_chart,
        names.len(),
        "charts/weft/crds has files crds/generated does not"
    );
}

#[derive(serde::Deserialize)]
struct Rule {
    #[serde(rename = "apiGroups")]
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

#[test]
fn rbac_rules_have_no_wildcard_and_no_secrets() {
    let files = chart().join("files");
    let mut checked = 0;
    for entry in std::fs::read_dir(&files).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("rules.yaml")
        {
            continue;
        }
        let rules: Vec<Rule> = serde_saphyr::from_str(&read(&path)).unwrap();
        assert!(!rules.is_empty(), "{}", path.display());
        for r in &rules {
            for v in r.api_groups.iter().chain(&r.resources).chain(&r.verbs) {
                assert!(!v.contains('*'), "{}: wildcard in {v:?}", path.display());
            }
            assert!(
                !r.resources
                    .iter()
                    .any(|res| res == "secrets" || res.starts_with("secrets/")),
                "{}: access to Secrets",
                path.display()
            );
            assert!(!r.verbs.is_empty() && !r.resources.is_empty());
            checked += 1;
        }
    }
    assert!(
        checked >= 8,
        "expected the controller's and the agent's rules"
    );
    // The templates take their rules from these files only.
    let rbac = read(&chart().join("templates/rbac.yaml"));
    assert_eq!(
        rbac.matches("rules:").count(),
        3,
        "every Role/ClusterRole reads files/*rules.yaml"
    );
    assert_eq!(rbac.matches(".Files.Get \"files/").count(), 3);
    // The agent never writes what it only reads.
    let agent: Vec<Rule> = serde_saphyr::from_str(&read(&files.join("agent-rules.yaml"))).unwrap();
    for r in &agent {
        let writes = r
            .verbs
            .iter()
            .any(|v| ["create", "update", "patch", "delete"].contains(&v.as_str()));
        if writes {
            assert!(
                r.resources
                    .iter()
                    .all(|res| res == "nodenetworks/status" || res == "events"),
                "the agent may write only NodeNetwork status and events: {:?}",
                r.resources
            );
        }
    }
}

#[test]
fn every_value_is_documented() {
    let values = read(&chart().join("values.yaml"));
    let mut prev = "";
    let mut checked = 0;
    for line in values.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim_start();
        let key = !t.is_empty() && !t.starts_with('#') && !t.starts_with('-') && t.contains(':');
        // A top-level section (`controller:`) only groups documented keys; deeper keys
        // (inside `resources`, selectors) belong to the documented value above them.
        let section = indent == 0 && t.ends_with(':');
        if key && indent <= 2 && !section {
            assert!(
                prev.trim_start().starts_with("# --"),
                "values.yaml: `{t}` has no `# --` comment above it"
            );
            checked += 1;
        }
        if !t.is_empty() {
            prev = line;
        }
    }
    assert!(checked >= 15, "only {checked} values found");
}

#[test]
fn workloads_are_least_privileged() {
    let agent = read(&chart().join("templates/agent.yaml"));
    assert!(agent.contains("hostNetwork: true"));
    assert!(agent.contains("privileged: false"));
    assert!(!agent.contains("privileged: true"));
    assert!(agent.contains("NET_ADMIN"));
    assert!(
        agent.contains("operator: Exists")
            || read(&chart().join("values.yaml")).contains("operator: Exists")
    );
    assert!(agent.contains("mountPropagation: HostToContainer"));
    assert!(agent.contains("--cleanup-config-on-exit"));
    let controller = read(&chart().join("templates/controller.yaml"));
    assert!(controller.contains("readOnlyRootFilesystem: true"));
    assert!(controller.contains("runAsNonRoot: true"));
    assert!(read(&chart().join("values.yaml")).contains("replicas: 2"));
    for probe in ["/healthz", "/readyz"] {
        assert!(
            controller.contains(probe) && agent.contains(probe),
            "{probe} probes"
        );
    }
}

#[test]
fn the_controller_runs_before_the_cni_works() {
    // A node has no CNI configuration until its agent gets a NodeNetwork from the controller,
    // so a controller on the pod network would wait forever.
    let controller = read(&chart().join("templates/controller.yaml"));
    assert!(controller.contains("hostNetwork: true"));
    assert!(controller.contains("dnsPolicy: ClusterFirstWithHostNet"));
    for taint in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/network-unavailable",
    ] {
        assert!(
            controller.contains(&format!(
                "{{key: {taint}, operator: Exists, effect: NoSchedule}}"
            )),
            "the controller tolerates {taint}"
        );
    }
    // Two replicas on the node's network would share the metrics port: one per node.
    assert!(controller.contains("podAntiAffinity:"));
    assert!(controller.contains("topologyKey: kubernetes.io/hostname"));
    assert!(controller.contains("maxSurge: 0"));
    let values = read(&chart().join("values.yaml"));
    let port = |section: &str| {
        let tail = &values[values.find(&format!("\n{section}:\n")).unwrap()..];
        let line = tail
            .lines()
            .find(|l| l.trim_start().starts_with("metricsPort:"))
            .unwrap();
        line.split(':').nth(1).unwrap().trim().to_owned()
    };
    assert_ne!(
        port("controller"),
        port("agent"),
        "the metrics ports share the node"
    );
    assert!(controller.contains("controller.metricsPort and agent.metricsPort must differ"));
}

#[test]
fn the_api_server_address_can_be_given_for_clusters_without_kube_proxy() {
    let values = read(&chart().join("values.yaml"));
    assert!(values.contains("\nkubernetesServiceHost: \"\"\n"));
    assert!(values.contains("\nkubernetesServicePort: \"\"\n"));
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    assert!(helpers.contains("name: KUBERNETES_SERVICE_HOST"));
    assert!(helpers.contains("name: KUBERNETES_SERVICE_PORT"));
    for workload in ["agent.yaml", "controller.yaml"] {
        let t = read(&chart().join("templates").join(workload));
        assert!(
            t.contains("include \"weft.apiServerEnv\""),
            "{workload} gets the API server's address"
        );
    }
    let readme = read(&chart().join("README.md"));
    assert!(
        readme.contains("`kubernetesServiceHost`") && readme.contains("`kubernetesServicePort`")
    );
}

#[test]
fn every_pod_pulls_its_image_as_the_values_say() {
    // With a private registry, a pod without imagePullSecrets hangs in ImagePullBackOff: the
    // uninstall hooks' too, and `helm uninstall` with them.
    let mut pods = Vec::new();
    for entry in std::fs::read_dir(chart().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = read(&path);
        for doc in text.split("\n---\n") {
            let Some(kind) = doc
                .lines()
                .find_map(|l| l.strip_prefix("kind: "))
                .map(str::trim)
            else {
                continue;
            };
            if !doc.contains("\n      containers:\n") {
                continue;
            }
            let name = doc
                .lines()
                .find_map(|l| l.strip_prefix("  name: "))
                .unwrap_or("?");
            let what = format!("{} {kind} {name}", path.display());
            assert!(
                doc.contains(
                    "      {{- with .Values.imagePullSecrets }}\n      imagePullSecrets:\n        {{- toYaml . | nindent 8 }}\n      {{- end }}\n"
                ),
                "{what}: no imagePullSecrets from .Values.imagePullSecrets"
            );
            let images = doc
                .matches("image: {{ include \"weft.image\" . }}\n")
                .count();
            let policies = doc
                .matches(
                    "image: {{ include \"weft.image\" . }}\n          imagePullPolicy: {{ .Values.image.pullPolicy }}\n",
                )
                .count();
            assert!(images > 0, "{what}: no weft image");
            assert_eq!(
                policies, images,
                "{what}: a container without imagePullPolicy from .Values.image.pullPolicy"
            );
            pods.push(what);
        }
    }
    for name in [
        "weft-agent",
        "weft-controller",
        "weft-cleanup",
        "weft-uninstall",
    ] {
        assert!(
            pods.iter().any(|p| p.ends_with(&format!(" {name}"))),
            "{name} not checked: {pods:?}"
        );
    }
}

#[test]
fn the_crd_upgrade_step_is_documented() {
    // `helm upgrade` never touches crds/: the README's upgrade section and the notes of an
    // upgrade give the step, with --force-conflicts (Helm's field manager owns the CRDs).
    let step = "kubectl apply --server-side --force-conflicts -f charts/weft/crds/";
    let readme = read(&chart().join("README.md"));
    let upgrading = &readme[readme.find("\n## Upgrading\n").unwrap()..];
    assert!(upgrading.contains(step), "README: {step}");
    assert!(upgrading.find(step) < upgrading.find("helm upgrade weft"));
    let notes = read(&chart().join("templates/NOTES.txt"));
    let on_upgrade = &notes[notes.find("{{- if .Release.IsUpgrade }}").unwrap()..];
    assert!(on_upgrade.contains(step), "NOTES.txt: {step}");
}
