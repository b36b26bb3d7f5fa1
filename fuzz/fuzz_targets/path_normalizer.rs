//! The path policy on arbitrary request targets, under both settings: it never panics, its
//! result is a fixed point, and nothing it accepts keeps a form that origins read differently.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::ingress::{normalize_target, Ambiguous, PathPolicy};

fuzz_target!(|target: &str| {
    for ambiguous in [Ambiguous::Reject, Ambiguous::Normalize] {
        for merge_slashes in [true, false] {
            let policy = PathPolicy {
                ambiguous,
                merge_slashes,
            };
            let Ok((path, full)) = normalize_target(target, &policy) else {
                continue;
            };
            assert!(path.starts_with('/'), "{target:?} gave {path:?}");
            assert!(full.starts_with(&path));
            assert!(!path.contains('\\') && !path.contains('?') && !path.contains(';'));
            assert!(!path.bytes().any(|b| b.is_ascii_control()));
            let upper = path.to_ascii_uppercase();
            assert!(!upper.contains("%2F") && !upper.contains("%5C"));
            for seg in path.split('/') {
                assert!(seg != "." && seg != "..", "{target:?} gave {path:?}");
            }
            if merge_slashes {
                assert!(!path.contains("//"), "{target:?} gave {path:?}");
            }
            let (again, _) = normalize_target(&path, &policy).expect("the result is accepted");
            assert_eq!(again, path, "not a fixed point for {target:?}");
        }
    }
});
