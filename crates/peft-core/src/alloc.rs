//! A global allocator for binaries that train or quantize: the system allocator, with large
//! blocks advised to use transparent huge pages on Linux.
//!
//! Training and dequantization allocate many fresh multi-megabyte buffers; with 4 KiB pages
//! the kernel faults and zeroes each page on first touch, which measured ~15% of a LoRA
//! training step and over half of a 64 MiB dequantization on the reference machine (see
//! `cargo xtask bench`). One 2 MiB huge page replaces 512 such faults. This is what glibc's
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` does, without needing the environment variable.
//!
//! It also keeps freed memory in the process (glibc: blocks up to 32 MiB come from the heap,
//! which is not trimmed back to the OS; set once, on the first allocation). burn's CPU backend
//! allocates a fresh output for every operation, and glibc's defaults hand a freed block of a
//! megabyte or more back to the OS, so the next one faults its pages in again, on every
//! thread: a 512x512x512 product with two threads took a median 2.6-3.3 ms that way and
//! 1.3-1.8 ms with the memory kept (`linear/plain_fwd`, observed on a 2-core Zen 4).
//!
//! It also counts the bytes it has handed out ([`live_bytes`]) and their high-water mark
//! ([`peak_bytes`], restarted by [`reset_peak`]): the memory a training step needs, without
//! what the system allocator keeps mapped after frees (which resident-size figures include).
//! Two relaxed atomic operations per allocation.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: peft_core::alloc::HugePageAlloc = peft_core::alloc::HugePageAlloc;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes allocated through [`HugePageAlloc`] and not yet freed (0 where it is not the global
/// allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes live at once since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Restart the high-water mark at the bytes live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// Blocks at least this large get the advice (one huge page; smaller ones cannot use one).
pub const HUGE_PAGE: usize = 2 << 20;

/// [`System`] plus `madvise(MADV_HUGEPAGE)` on blocks of [`HUGE_PAGE`] bytes or more.
pub struct HugePageAlloc;

#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < HUGE_PAGE {
        return;
    }
    // madvise wants a page-aligned start; advise the whole pages inside the block.
    let start = (ptr as usize).next_multiple_of(4096);
    let end = (ptr as usize + size) & !4095;
    if end > start {
        // Advice only: failure (THP disabled, old kernel) leaves normal pages.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _size: usize) {}

static KEEPING: AtomicBool = AtomicBool::new(false);

/// Once per process, before the first allocation: glibc serves blocks below 32 MiB (its
/// largest such setting) from the heap and keeps up to 1 GiB of freed heap instead of
/// returning it, so that repeated same-sized buffers reuse pages that are already mapped.
/// A relaxed load per allocation after that.
#[inline]
fn keep_freed_memory() {
    if KEEPING.load(Ordering::Relaxed) || KEEPING.swap(true, Ordering::Relaxed) {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's parameters (it does not allocate).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        keep_freed_memory();
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        keep_freed_memory();
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            return p;
        }
        if new_size > layout.size() {
            grew(new_size - layout.size());
            advise(p, new_size);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_bytes_and_their_peak() {
        // Not the global allocator in this test binary: only these calls are counted.
        let layout = Layout::from_size_align(1 << 20, 64).unwrap();
        let base = live_bytes();
        unsafe {
            let p = HugePageAlloc.alloc(layout);
            reset_peak();
            let q = HugePageAlloc.alloc(layout);
            assert!(live_bytes() >= base + (2 << 20));
            HugePageAlloc.dealloc(q, layout);
            assert!(
                peak_bytes() >= base + (2 << 20),
                "the peak remembers the freed block"
            );
            let p = HugePageAlloc.realloc(p, layout, 3 << 20);
            assert!(live_bytes() >= base + (3 << 20));
            HugePageAlloc.dealloc(p, Layout::from_size_align(3 << 20, 64).unwrap());
        }
    }

    #[test]
    fn large_and_small_blocks_round_trip() {
        for size in [16, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 123] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            unsafe {
                let p = HugePageAlloc.alloc_zeroed(layout);
                assert!(!p.is_null());
                let bytes = std::slice::from_raw_parts_mut(p, size);
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "alloc_zeroed gave non-zero bytes"
                );
                bytes.fill(7);
                let p = HugePageAlloc.realloc(p, layout, size * 2);
                let grown = std::slice::from_raw_parts(p, size * 2);
                assert!(
                    grown[..size].iter().all(|&b| b == 7),
                    "realloc lost the contents"
                );
                HugePageAlloc.dealloc(p, Layout::from_size_align(size * 2, 64).unwrap());
            }
        }
    }
}
