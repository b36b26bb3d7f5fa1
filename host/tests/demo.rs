//! `sluice demo` prints a curl command that works, and stops on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn demo_prints_a_working_curl_command() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with("curl "))
    });
    let line = tokio::time::timeout(support::WAIT, line).await.expect("demo printed no curl line").unwrap();
    let line = line.expect("demo exited before printing a curl line");

    // curl -H 'Host: NAME' http://ADDR/PATH
    let host = line.split("Host: ").nth(1).unwrap().split('\'').next().unwrap().to_string();
    let url = line.split_whitespace().last().unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap());
    let reply = support::get(addr.parse().unwrap(), &host, path).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["path"], path);
    assert_eq!(json["headers"]["host"][0], host.as_str());

    let status = Command::new("sh").args(["-c", &format!("kill -TERM {}", child.id())]).status().unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        assert!(start.elapsed() < support::WAIT, "demo did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
