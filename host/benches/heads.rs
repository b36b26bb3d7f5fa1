//! Head-encoding benchmark: the CPU time a request spends on its two heads (the request head
//! encoded at the edge and decoded at the connector, the response head the other way), in
//! JSON and in the binary form, for heads like those of `bench/compare`'s requests. Each
//! iteration starts from the header maps and ends with the decoded maps, as the real path
//! does (the maps are cloned in, which the real path does not do: a slight overcount).
//!
//! Run: `cargo bench -p sluice --bench heads` (iterations: `SLUICE_BENCH_ITERS`, default 200000).

use std::time::Instant;

use sluice::proto::{HeadCodec, RequestHead, ResponseHead, ResponseSource};

fn main() {
    let iters: u32 = std::env::var("SLUICE_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let id = "0123456789abcdef0123456789abcdef";
    let request = RequestHead {
        request_id: id.into(),
        method: "GET".into(),
        scheme: "http".into(),
        authority: "bench.test".into(),
        path: "/100b".into(),
        headers: [
            ("user-agent", "oha/1.4.0"),
            ("accept", "*/*"),
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "bench.test"),
            ("sluice-request-id", id),
        ]
        .map(|(n, v)| (n.to_string(), v.into()))
        .to_vec()
        .into(),
        client_addr: Some("127.0.0.1:44444".into()),
        upgrade: None,
        empty_body: true,
        trailers: false,
    };
    let response = ResponseHead {
        status: 200,
        headers: [
            ("server", "nginx/1.22.1"),
            ("date", "Fri, 27 Nov 2026 05:00:00 GMT"),
            ("content-type", "application/octet-stream"),
            ("content-length", "100"),
            ("last-modified", "Fri, 27 Nov 2026 04:00:00 GMT"),
            ("etag", "\"6a3f1c2b-64\""),
            ("accept-ranges", "bytes"),
        ]
        .map(|(n, v)| (n.to_string(), v.into()))
        .to_vec()
        .into(),
        source: ResponseSource::Origin,
    };
    let req_map = request.headers.map.clone();
    let resp_map = response.headers.map.clone();
    println!("head encoding, both heads of one request, {iters} iterations (best of 3)");
    for codec in [HeadCodec::Json, HeadCodec::Binary] {
        let best = (0..3)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..iters {
                    let mut request = request.clone();
                    request.headers = req_map.clone().into();
                    let frame = codec.encode_request(&request).unwrap();
                    let req = codec.decode_request(&frame.slice(4..)).unwrap();
                    let mut response = response.clone();
                    response.headers = resp_map.clone().into();
                    let frame = codec.encode_response(&response).unwrap();
                    let resp = codec.decode_response(&frame.slice(4..)).unwrap();
                    std::hint::black_box((req.headers.map, resp.headers.map));
                }
                t.elapsed().as_secs_f64() * 1e6 / f64::from(iters)
            })
            .fold(f64::INFINITY, f64::min);
        let size = codec.encode_request(&request).unwrap().len()
            + codec.encode_response(&response).unwrap().len();
        println!("{codec:<8?} {best:>6.2} µs per request   {size} bytes on the wire");
    }
}
