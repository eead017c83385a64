//! Pools are kept for the process, one per distinct thread count, at most 16: past that a new
//! count is an error, and the counts already made keep working.

mod common;

use common::tiny::{build, Spec};
use llama_core::{Error, Model, ModelOptions, SessionOptions};

#[test]
fn distinct_thread_counts_are_capped() {
    let t = build(Spec::default());
    let m = Model::load(&t.gguf, ModelOptions::default().with_threads(1)).unwrap();
    let mut made = vec![];
    let mut refused = None;
    for n in 1..=40 {
        match m.session(SessionOptions::default().threads(n)) {
            Ok(s) => made.push((n, s)),
            Err(e) => {
                assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
                refused = Some(n);
                break;
            }
        }
    }
    let refused = refused.expect("a 17th distinct thread count is refused");
    assert!((2..=17).contains(&made.len()), "{} pools", made.len());
    assert!(refused <= 17);
    for (n, s) in &mut made {
        assert_eq!(s.threads(), *n);
        s.eval(&[1, 2, 3]).unwrap();
    }
    // A count already made is reused, not refused.
    assert!(m.session(SessionOptions::default().threads(1)).is_ok());
}
