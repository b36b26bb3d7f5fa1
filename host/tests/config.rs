//! Configuration: every bad file in `tests/config/invalid` prints exactly its `.err` through
//! `sluice check`, and every file in `examples/` parses.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

#[test]
fn invalid_configs_print_their_exact_error() {
    let dir = Path::new("tests/config/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "expected the golden files, found {}",
        files.len()
    );
    for file in &files {
        let expected = std::fs::read_to_string(file.with_extension("err"))
            .unwrap_or_else(|_| panic!("{} has no .err file", file.display()));
        let (ok, _, err) = check(file);
        assert!(!ok, "{} was accepted", file.display());
        assert_eq!(err, expected, "for {}", file.display());
    }
}

#[test]
fn check_accepts_a_valid_file() {
    let dir = tempdir("check-valid");
    std::fs::write(
        dir.join("connector.toml"),
        "tunnel = \"app\"\ntoken = \"x\"\nedges = [\"127.0.0.1:7844\"]\n[[ingress]]\norigin = \"hello\"\n",
    )
    .unwrap();
    let out = sluice()
        .arg("check")
        .arg("--config")
        .arg(dir.join("connector.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("valid connector config (1 ingress rule, 0 origins + 1 built-in, 0 plugins)"));
}

/// `sluice check --match URL` names the rule, the chain and the origin a request would get.
#[test]
fn check_match_explains_where_a_url_goes() {
    let dir = tempdir("check-match");
    let file = dir.join("connector.toml");
    std::fs::write(
        &file,
        r#"tunnel = "app"
token = "x"
edges = ["127.0.0.1:7844"]

[[origin]]
name = "api"
url = "h2c://10.0.0.5:50051"

[[origin]]
name = "socket"
url = "unix:/run/app.sock"

[[origin]]
name = "api-2"
url = "http://10.0.0.6:50051"

[[pool]]
name = "apis"
members = ["api", "api-2"]
balance = "hash"
hash-on = "cookie:session"
[pool.health]
path = "/healthz"
interval = "2s"

[[ingress]]
hostname = "pool.example.com"
origin = "apis"

[[ingress]]
hostname = "api.example.com"
origin = "api"

[[ingress]]
path = "^/static/"
origin = "socket"

[[ingress]]
origin = "hello"
"#,
    )
    .unwrap();
    let run = |url: &str| {
        let out = sluice()
            .args(["check", "--config"])
            .arg(&file)
            .args(["--match", url])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run("https://API.example.com/v1/Greeter/Hello");
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "https://api.example.com/v1/Greeter/Hello\n  rule: ingress[1] (hostname \"api.example.com\")\n  plugins: none\n  origin: \"api\" -> http://10.0.0.5:50051/\n"
    );
    let (_, out, _) = run("http://www.example.com/static/../static/app.js");
    assert!(
        out.contains("path normalised from /static/../static/app.js"),
        "{out}"
    );
    assert!(
        out.contains("origin: \"socket\" -> unix:/run/app.sock"),
        "{out}"
    );
    let (_, out, _) = run("https://pool.example.com/");
    assert!(
        out.contains("pool: \"apis\" (hash of cookie session) -> api, api-2"),
        "{out}"
    );
    let (ok, _, err) = run("www.example.com/");
    assert!(!ok);
    assert!(err.contains("absolute"), "{err}");
}

/// The examples reference certificates and token files an operator would provide; this test
/// provides them (generated) in a copy of the examples folder, then parses every TOML file.
#[test]
fn every_example_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let work = tempdir("examples");
    copy_dir(&root, &work);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_pem, key_pem) = (ck.cert.pem(), ck.key_pair.serialize_pem());
    std::fs::create_dir_all(work.join("certs")).unwrap();
    std::fs::create_dir_all(work.join("tokens")).unwrap();
    for name in ["public", "edge"] {
        std::fs::write(work.join(format!("certs/{name}.crt")), &cert_pem).unwrap();
        std::fs::write(work.join(format!("certs/{name}.key")), &key_pem).unwrap();
    }
    for name in ["edge-ca", "internal-ca"] {
        std::fs::write(work.join(format!("certs/{name}.crt")), &cert_pem).unwrap();
    }
    std::fs::write(work.join("tokens/app.token"), "app-token\n").unwrap();
    std::fs::write(work.join("tokens/wiki.token"), "wiki-token\n").unwrap();
    std::env::set_var("SLUICE_APP_TOKEN", "app-token");

    let mut parsed = Vec::new();
    for file in toml_files(&work) {
        match sluice::config::load_any(&file) {
            Ok(_) => parsed.push(file),
            Err(e) => panic!("example does not parse: {e}"),
        }
    }
    assert_eq!(parsed.len(), 5, "parsed {parsed:?}");
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(toml_files(&path));
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// `workers` sizes the async runtime: a connector told to run three more workers than the
/// machine has cores (the default, one per core) runs that many worker threads.
#[test]
fn workers_sets_the_number_of_runtime_threads() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = cores + 3;
    let dir = tempdir("workers");
    let file = dir.join("connector.toml");
    // Nothing answers on the discard port: the connector keeps dialing, and stays up.
    std::fs::write(
        &file,
        format!("tunnel = \"app\"\ntoken = \"x\"\nedges = [\"127.0.0.1:9\"]\nworkers = {wanted}\n[[ingress]]\norigin = \"hello\"\n"),
    )
    .unwrap();
    let mut child = sluice()
        .args(["connector", "--config"])
        .arg(&file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let workers = || {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|comm| comm.trim() == "tokio-rt-worker")
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut seen = workers();
    while seen < wanted && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        seen = workers();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen >= wanted,
        "the connector runs {seen} worker threads, not {wanted}"
    );
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A connector file with one plugin, `[[plugin]]` on line 6.
fn plugin_file(dir: &Path, wasm: &Path, config: &str) -> PathBuf {
    let file = dir.join("connector.toml");
    std::fs::write(
        &file,
        format!(
            "tunnel = \"app\"\ntoken = \"x\"\nedges = [\"127.0.0.1:7844\"]\nplugins = [\"p\"]\n\n[[plugin]]\nname = \"p\"\npath = {:?}\n[plugin.config]\n{config}\n\n[[ingress]]\norigin = \"hello\"\n",
            wasm.display().to_string()
        ),
    )
    .unwrap();
    file
}

fn check(file: &Path) -> (bool, String, String) {
    let out = sluice()
        .arg("check")
        .arg("--config")
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_loads_every_plugin_and_runs_its_init() {
    let dir = tempdir("check-plugins");
    let rewrite = support::example_plugin("header-rewrite");

    let (ok, out, err) = check(&plugin_file(
        &dir,
        &rewrite,
        "request = { set = { x-a = \"1\" } }",
    ));
    assert!(ok, "{err}");
    assert!(
        out.contains("plugin \"p\": init ok; exports on-request, on-response"),
        "{out}"
    );

    // A configuration the plugin refuses: the file and line of its block, and the key path
    // inside [plugin.config] (not a position in the JSON the host hands over).
    let (ok, _, err) = check(&plugin_file(&dir, &rewrite, "request = { set = 5 }"));
    assert!(!ok);
    let file = dir.join("connector.toml");
    assert!(
        err.starts_with(&format!("error: {}:6 (plugin[0]): plugin \"p\" rejected its configuration: \"invalid configuration: request.set: invalid type: integer `5`, expected a map\"", file.display())),
        "{err}"
    );
    assert!(!err.contains("line 1 column"), "{err}");

    // A missing file.
    let (ok, _, err) = check(&plugin_file(&dir, &dir.join("missing.wasm"), ""));
    assert!(!ok);
    assert!(
        err.contains("cannot read") && err.contains("missing.wasm"),
        "{err}"
    );

    // A core module (what a wasm32-wasip1 build gives).
    let core = dir.join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let (ok, _, err) = check(&plugin_file(&dir, &core, ""));
    assert!(!ok);
    assert!(err.contains("this is a core WebAssembly module, not a component: build the plugin with `cargo build --target wasm32-wasip2`"), "{err}");

    // A component built without export_plugin!: it would load and do nothing.
    let (ok, _, err) = check(&plugin_file(&dir, &support::fixture("nohooks"), ""));
    assert!(!ok);
    assert!(
        err.contains("exports no hook") && err.contains("sluice_sdk::export_plugin!(YourPlugin);"),
        "{err}"
    );
}

#[test]
fn plugin_test_refuses_a_component_that_exports_no_hook() {
    let out = sluice()
        .args(["plugin", "test"])
        .arg(support::fixture("nohooks"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exports no hook") && err.contains("export_plugin!"),
        "{err}"
    );
}

#[test]
fn plugin_test_refuses_a_header_that_is_not_http() {
    let out = sluice()
        .args(["plugin", "test"])
        .arg(support::fixture("echo"))
        .args(["-H", "bad name: x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(r#"invalid --header "bad name: x""#), "{err}");
}
