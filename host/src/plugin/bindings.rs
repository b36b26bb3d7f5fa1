//! Host bindings generated from the plugin worlds: `wit/plugin.wit` (`sluice:plugin@0.2.0`,
//! re-exported at this module's root: the types the rest of the host works with) and
//! `wit/v0.1/plugin.wit` (0.1.0, frozen, for components built against it).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    exports: { default: async },
    // The key-value store (with Redis) and outbound HTTP wait on the network: their calls
    // suspend the hook's fiber, never a worker thread.
    imports: { "sluice:plugin/kv": async, "sluice:plugin/http": async },
    with: {
        "sluice:plugin/types.request": super::host::SharedView,
    },
});

/// `sluice:plugin@0.1.0`: its results are turned into 0.2.0's types as they come back, so
/// that the chain and the decision checks know one set of types.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1",
        world: "plugin",
        exports: { default: async },
        with: {
            "sluice:plugin/types.request": crate::plugin::host::SharedView,
        },
    });

    use self::sluice::plugin::types as old;
    use super::sluice::plugin::types as now;

    impl From<old::Header> for now::Header {
        fn from(h: old::Header) -> Self {
            now::Header {
                name: h.name,
                value: h.value,
            }
        }
    }

    impl From<now::Header> for old::Header {
        fn from(h: now::Header) -> Self {
            old::Header {
                name: h.name,
                value: h.value,
            }
        }
    }

    impl From<old::HeaderEdit> for now::HeaderEdit {
        fn from(e: old::HeaderEdit) -> Self {
            match e {
                old::HeaderEdit::Set(h) => now::HeaderEdit::Set(h.into()),
                old::HeaderEdit::Append(h) => now::HeaderEdit::Append(h.into()),
                old::HeaderEdit::Remove(n) => now::HeaderEdit::Remove(n),
            }
        }
    }

    impl From<old::RequestDecision> for now::RequestDecision {
        fn from(d: old::RequestDecision) -> Self {
            now::RequestDecision {
                headers: d.headers.into_iter().map(Into::into).collect(),
                path: d.path,
                origin: d.origin,
                respond: d.respond.map(|r| now::LocalResponse {
                    status: r.status,
                    headers: r.headers.into_iter().map(Into::into).collect(),
                    body: r.body,
                }),
            }
        }
    }

    impl From<old::ResponseDecision> for now::ResponseDecision {
        fn from(d: old::ResponseDecision) -> Self {
            now::ResponseDecision {
                headers: d.headers.into_iter().map(Into::into).collect(),
                status: None,
                body: None,
            }
        }
    }

    impl From<&now::Response> for old::Response {
        fn from(r: &now::Response) -> Self {
            old::Response {
                status: r.status,
                headers: r.headers.iter().cloned().map(Into::into).collect(),
            }
        }
    }

    impl From<&now::Completion> for old::Completion {
        fn from(c: &now::Completion) -> Self {
            old::Completion {
                status: c.status,
                origin: c.origin.clone(),
                duration_us: c.duration_us,
                bytes_in: c.bytes_in,
                bytes_out: c.bytes_out,
                error: c.error.clone(),
            }
        }
    }
}
