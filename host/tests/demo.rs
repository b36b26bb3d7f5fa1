//! `sluice demo` prints a curl command that works, and stops on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn demo_prints_a_working_curl_command() {
    let plugin_dir = support::example_plugin("header-rewrite")
        .parent()
        .unwrap()
        .to_path_buf();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--port", "0", "--plugins"])
        .arg(&plugin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = loop {
        let next = tokio::time::timeout(support::WAIT, lines.recv())
            .await
            .expect("demo printed no curl line");
        let line = next.expect("demo exited before printing a curl line");
        if line.starts_with("curl ") {
            break line;
        }
    };

    // curl -H 'Host: NAME' http://ADDR/PATH
    let host = line
        .split("Host: ")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_string();
    let url = line.split_whitespace().last().unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let reply = support::get(addr.parse().unwrap(), &host, path).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["path"], path);
    assert_eq!(json["headers"]["host"][0], host.as_str());
    // The header-rewrite plugin's header reached the origin, and its response header the client.
    assert_eq!(
        json["headers"]["x-sluice-demo"][0],
        "hello from the header-rewrite plugin"
    );
    assert_eq!(
        reply.headers["x-sluice-plugins"],
        "header-rewrite, audit-log"
    );
    // The audit-log plugin wrote an audit line on stdout.
    let audit = loop {
        let next = tokio::time::timeout(support::WAIT, lines.recv())
            .await
            .expect("no audit line on stdout");
        let line = next.expect("demo exited");
        if line.starts_with('{') {
            break line;
        }
    };
    let event: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(event["plugin"], "audit-log");
    assert_eq!(event["attributes"]["path"], path);
    assert_eq!(event["attributes"]["status"], "200");

    let status = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        assert!(
            start.elapsed() < support::WAIT,
            "demo did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
