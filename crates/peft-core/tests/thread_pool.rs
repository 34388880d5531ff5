//! `cpu::join_thread_pool` makes the calling thread a thread of rayon's global pool (its own
//! test binary: the global pool is made once per process).

use rayon::prelude::*;

#[test]
fn the_calling_thread_joins_the_global_pool_once() {
    assert_eq!(rayon::current_thread_index(), None);
    peft_core::cpu::join_thread_pool().expect("no pool yet in this process");
    assert_eq!(rayon::current_thread_index(), Some(0));
    // Parallel work started here runs (on this thread and the others) and adds up.
    let sum: u64 = (0..100_000u64).into_par_iter().map(|i| i % 7).sum();
    assert_eq!(sum, (0..100_000u64).map(|i| i % 7).sum::<u64>());
    // A second call finds the pool made and leaves it.
    assert!(peft_core::cpu::join_thread_pool().is_err());
    assert_eq!(rayon::current_thread_index(), Some(0));
}
