//! `cpu::join_thread_pool` makes the calling thread a thread of rayon's global pool, and
//! keeps each thread on its own CPU when there is one thread per CPU (its own test binary:
//! the global pool is made once per process).

#![cfg(target_os = "linux")]

use rayon::prelude::*;

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
    unsafe { libc::CPU_COUNT(&set) as usize }
}

#[test]
fn the_calling_thread_joins_the_global_pool_once() {
    assert_eq!(rayon::current_thread_index(), None);
    let cpus = allowed_cpus();
    peft_core::cpu::join_thread_pool().expect("no pool yet in this process");
    assert_eq!(rayon::current_thread_index(), Some(0));
    // One thread per allowed CPU unless RAYON_NUM_THREADS says otherwise; then pinned.
    let default_size = std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("PEFT_PIN_THREADS").is_none();
    if default_size {
        assert_eq!(rayon::current_num_threads(), cpus);
        let pinned = if cpus > 1 { 1 } else { cpus };
        assert_eq!(allowed_cpus(), pinned, "the main thread keeps to one CPU");
        // Every other thread too, each on its own.
        let per_thread: Vec<usize> = rayon::broadcast(|_| allowed_cpus());
        assert!(per_thread.iter().all(|&n| n == pinned), "{per_thread:?}");
    }
    // Parallel work started here runs (on this thread and the others) and adds up.
    let sum: u64 = (0..100_000u64).into_par_iter().map(|i| i % 7).sum();
    assert_eq!(sum, (0..100_000u64).map(|i| i % 7).sum::<u64>());
    // A second call finds the pool made and leaves it.
    assert!(peft_core::cpu::join_thread_pool().is_err());
    assert_eq!(rayon::current_thread_index(), Some(0));
}
