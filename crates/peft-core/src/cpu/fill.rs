//! Kernel outputs written in parallel with no fill pass first.
//!
//! A fused kernel's output is a fresh vector that the kernel writes value by value; zeroing it
//! first is one more pass over megabytes a training step (`memset` was 1.7% of an AVX2 LoRA
//! step's samples in `perf`). So [`par_fill`] hands each task its chunk uninitialised
//! (`MaybeUninit`) and takes back the same chunk as initialised values. That hand-back is the
//! proof: a safe `&mut [T]` at the chunk's address and length can only exist once every value
//! there is written, so [`par_fill`] checks the address and length and needs nothing else.
//!
//! The writers here make such a proof for the shapes kernels have: [`write_each`] (one value
//! per place, from an iterator the compiler vectorizes), [`write_rows`] (a chunk written row by
//! row), [`write_split`] (a chunk written in two parts) and [`zeroed`].
//!
//! In a `simd_dispatch!` body, mark a closure handed to [`write_rows`] or [`write_split`]
//! `#[inline(always)]`: one the compiler leaves out of line is built without the body's vector
//! instructions (`perf` showed the RMSNorm and RoPE rows so, slower than before).

use std::mem::MaybeUninit;

/// `n` zeros for a kernel's output, written by every thread of the pool: `vec![0.0; n]` is a
/// memset on the calling thread alone while the others wait, and the fused kernels' outputs
/// are megabytes (a training step of the benchmark Llama zero-filled about 100 MB this way).
pub fn zeros(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    /// Values per parallel task (128 KiB); below one task the calling thread writes them.
    const CHUNK: usize = 1 << 15;
    if n <= CHUNK {
        return vec![0.0; n];
    }
    let mut values = Vec::with_capacity(n);
    values.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .for_each(|c| c.fill(MaybeUninit::new(0.0)));
    // SAFETY: the loop above wrote all `n` values.
    unsafe { values.set_len(n) };
    values
}

/// `n` values of a kernel's output (f32, or bytes), written by `write` on the pool chunk by
/// chunk (`chunk` values each, the last one shorter), each chunk with the item of `inputs` at
/// its index. `write` gets its chunk uninitialised and hands the same chunk back written
/// (made by the writers of this module, or [`zeroed`] first where a kernel accumulates).
///
/// # Panics
/// When `inputs` has fewer items than there are chunks, or `write` hands back anything but
/// its chunk.
pub fn par_fill<T, I>(
    n: usize,
    chunk: usize,
    inputs: I,
    write: impl for<'a> Fn(&'a mut [MaybeUninit<T>], I::Item) -> &'a mut [T] + Sync + Send,
) -> Vec<T>
where
    T: Send + Sync,
    I: rayon::iter::IndexedParallelIterator,
{
    use rayon::prelude::*;
    let chunk = chunks_for(n, chunk, inputs.len());
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .zip(inputs)
        .for_each(|(o, item)| {
            let place = Place::of(o);
            place.check(write(o, item));
        });
    // SAFETY: every chunk was handed back as initialised values (checked above: a panic
    // there leaves `out` empty), and the chunks cover `..n` (`inputs` has an item for each).
    unsafe { out.set_len(n) };
    out
}

/// [`par_fill`] for a kernel with two outputs of `n` values each, chunked alike (`write`
/// gets the same chunk of both and hands both back).
///
/// # Panics
/// As [`par_fill`].
pub fn par_fill_pair<I>(
    n: usize,
    chunk: usize,
    inputs: I,
    write: impl for<'a, 'b> Fn(
        &'a mut [MaybeUninit<f32>],
        &'b mut [MaybeUninit<f32>],
        I::Item,
    ) -> (&'a mut [f32], &'b mut [f32])
    + Sync
    + Send,
) -> (Vec<f32>, Vec<f32>)
where
    I: rayon::iter::IndexedParallelIterator,
{
    use rayon::prelude::*;
    let chunk = chunks_for(n, chunk, inputs.len());
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    a.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .zip(b.spare_capacity_mut()[..n].par_chunks_mut(chunk))
        .zip(inputs)
        .for_each(|((a, b), item)| {
            let places = (Place::of(a), Place::of(b));
            let (wa, wb) = write(a, b, item);
            places.0.check(wa);
            places.1.check(wb);
        });
    // SAFETY: as in `par_fill`, for both.
    unsafe {
        a.set_len(n);
        b.set_len(n);
    }
    (a, b)
}

/// The chunk length of a [`par_fill`] (at least 1), checking that its inputs cover the chunks.
fn chunks_for(n: usize, chunk: usize, inputs: usize) -> usize {
    let chunk = chunk.max(1);
    let chunks = n.div_ceil(chunk);
    assert!(
        inputs >= chunks,
        "par_fill: {inputs} inputs for {chunks} chunks"
    );
    chunk
}

/// Where an uninitialised part of an output is, to check that what a writer hands back is
/// that part.
#[derive(Clone, Copy)]
struct Place {
    start: usize,
    len: usize,
}

impl Place {
    fn of<T>(part: &[MaybeUninit<T>]) -> Place {
        Place {
            start: part.as_ptr() as usize,
            len: part.len(),
        }
    }

    /// Panics unless `written` is this place: then every value of it is initialised (a
    /// `&mut [T]` can only be made of initialised values without `unsafe`).
    fn check<T>(self, written: &mut [T]) {
        assert!(
            written.as_ptr() as usize == self.start && written.len() == self.len,
            "a kernel handed back {} values other than the {} it was to write",
            written.len(),
            self.len
        );
    }
}

/// `part` as the values it holds, once they are all written.
///
/// # Safety
/// Every value of `part` is initialised.
unsafe fn assume_written<T>(part: &mut [MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: initialised (the caller's promise); T and MaybeUninit<T> share a layout.
    unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `part` set to zeros (`T::default()`), as the values it then holds: for a kernel that adds
/// into its output, or leaves some of it at zero.
pub fn zeroed<T: Copy + Default>(part: &mut [MaybeUninit<T>]) -> &mut [T] {
    part.fill(MaybeUninit::new(T::default()));
    // SAFETY: every value of `part` was just written.
    unsafe { assume_written(part) }
}

/// `part` filled from `values`, one per place in order, and handed back as the values it
/// then holds. Inlined into the caller's (vectorized, `simd_dispatch!`ed) loop.
///
/// # Panics
/// When `values` runs out before `part` is full.
#[inline(always)]
pub fn write_each<T>(part: &mut [MaybeUninit<T>], values: impl Iterator<Item = T>) -> &mut [T] {
    let mut written = 0;
    for (place, v) in part.iter_mut().zip(values) {
        place.write(v);
        written += 1;
    }
    assert_eq!(written, part.len(), "write_each: values ran out");
    // SAFETY: the loop wrote the first `written` values, which is all of them.
    unsafe { assume_written(part) }
}

/// [`write_each`] into two parts of one length at once, from pairs of values (a kernel that
/// yields two outputs from one computation).
///
/// # Panics
/// When the parts differ in length or `values` runs out before they are full.
#[inline(always)]
pub fn write_each_pair<'a, 'b, T>(
    a: &'a mut [MaybeUninit<T>],
    b: &'b mut [MaybeUninit<T>],
    values: impl Iterator<Item = (T, T)>,
) -> (&'a mut [T], &'b mut [T]) {
    assert_eq!(a.len(), b.len(), "write_each_pair: parts of two lengths");
    let mut written = 0;
    for ((pa, pb), (va, vb)) in a.iter_mut().zip(b.iter_mut()).zip(values) {
        pa.write(va);
        pb.write(vb);
        written += 1;
    }
    assert_eq!(written, a.len(), "write_each_pair: values ran out");
    // SAFETY: the loop wrote the first `written` values of both, which is all of them.
    unsafe { (assume_written(a), assume_written(b)) }
}

/// `part` written row by row: `write_row(r, row)` gets row `r` (`row_len` values; the last
/// row shorter when `row_len` does not divide the length) and hands it back written.
///
/// # Panics
/// When `write_row` hands back anything but its row.
#[inline(always)]
pub fn write_rows<T>(
    part: &mut [MaybeUninit<T>],
    row_len: usize,
    mut write_row: impl FnMut(usize, &mut [MaybeUninit<T>]) -> &mut [T],
) -> &mut [T] {
    for (r, row) in part.chunks_mut(row_len.max(1)).enumerate() {
        let place = Place::of(row);
        place.check(write_row(r, row));
    }
    // SAFETY: every row was handed back as initialised values (checked), and the rows cover
    // `part`.
    unsafe { assume_written(part) }
}

/// `part` written in two parts, `..mid` by `first` and `mid..` by `second`, each handing its
/// part back written.
///
/// # Panics
/// When `mid` is past the end, or a writer hands back anything but its part.
#[inline(always)]
pub fn write_split<T>(
    part: &mut [MaybeUninit<T>],
    mid: usize,
    first: impl FnOnce(&mut [MaybeUninit<T>]) -> &mut [T],
    second: impl FnOnce(&mut [MaybeUninit<T>]) -> &mut [T],
) -> &mut [T] {
    let (a, b) = part.split_at_mut(mid);
    let places = (Place::of(a), Place::of(b));
    places.0.check(first(a));
    places.1.check(second(b));
    // SAFETY: both parts were handed back as initialised values (checked), and they are all
    // of `part`.
    unsafe { assume_written(part) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Every value zero at every length: below one task, one task exactly, and a partial
    /// last task.
    #[test]
    fn zeros_are_zeros() {
        for n in [0, 5, 1 << 15, (1 << 17) + 3] {
            let z = zeros(n);
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&v| v.to_bits() == 0), "{n}");
        }
    }

    /// Each chunk reaches `write` with its own input, at every length (empty, one chunk, a
    /// partial last chunk); the pair gets the same chunks of both outputs.
    #[test]
    fn par_fill_hands_each_chunk_its_input() {
        for n in [0usize, 1, 7, 8, 1000, (1 << 16) + 5] {
            let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let out = par_fill(n, 8, input.par_chunks(8), |o, x| {
                write_each(o, x.iter().map(|x| 2.0 * x))
            });
            let doubled: Vec<f32> = input.iter().map(|x| 2.0 * x).collect();
            assert_eq!(out, doubled, "{n}");
            let (a, b) = par_fill_pair(n, 8, input.par_chunks(8).enumerate(), |a, b, (i, x)| {
                assert_eq!((a.len(), b.len()), (x.len(), x.len()));
                write_each_pair(a, b, x.iter().map(|&x| (x, i as f32)))
            });
            assert_eq!(a, input);
            assert!(
                b.iter().enumerate().all(|(j, &v)| v == (j / 8) as f32),
                "{n}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "par_fill: 1 inputs for 2 chunks")]
    fn par_fill_needs_an_input_for_every_chunk() {
        let _ = par_fill(9, 8, [0u8].par_iter(), |o: &mut [MaybeUninit<f32>], _| {
            zeroed(o)
        });
    }

    /// A writer that hands back less than its chunk (the rest unwritten) is caught, not
    /// read.
    #[test]
    #[should_panic(expected = "handed back 3 values other than the 4")]
    fn par_fill_refuses_a_chunk_handed_back_short() {
        let input = [1f32; 8];
        let _ = par_fill(8, 4, input.par_chunks(4), |o, x| {
            write_each(&mut o[..3], x.iter().copied())
        });
    }

    #[test]
    #[should_panic(expected = "write_each: values ran out")]
    fn write_each_needs_a_value_for_every_place() {
        let mut part = [MaybeUninit::<f32>::uninit(); 4];
        write_each(&mut part, [1.0, 2.0, 3.0].into_iter());
    }

    /// Rows (the last one short) and two parts reach their writers in order, and the whole
    /// comes back as what they wrote.
    #[test]
    fn rows_and_parts_are_written_in_place() {
        let mut part = [MaybeUninit::<f32>::uninit(); 7];
        let rows = write_rows(&mut part, 3, |r, row| {
            write_each(row, std::iter::repeat(r as f32))
        });
        assert_eq!(rows, &[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0]);
        let mut part = [MaybeUninit::<u8>::uninit(); 5];
        let split = write_split(&mut part, 2, zeroed, |b| write_each(b, 7u8..));
        assert_eq!(split, &[0, 0, 7, 8, 9]);
    }

    proptest::proptest! {
        /// Any length, chunk, row length and split point: chunks written row by row, each
        /// row in two parts (the first `mid` values, the rest), hold what a plain loop gives.
        #[test]
        fn chunks_rows_and_parts_hold_every_value(
            n in 0usize..3000,
            chunk in 1usize..700,
            row_len in 1usize..64,
            mid in 0usize..64,
        ) {
            let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let out = par_fill(n, chunk, input.par_chunks(chunk), |o, x| {
                write_rows(o, row_len, |r, o| {
                    let x = &x[r * row_len..][..o.len()];
                    let mid = mid.min(o.len());
                    write_split(
                        o,
                        mid,
                        |a| write_each(a, x[..mid].iter().map(|v| v + 1.0)),
                        |b| write_each(b, x[mid..].iter().map(|v| 2.0 * v)),
                    )
                })
            });
            let want: Vec<f32> = input
                .iter()
                .enumerate()
                .map(|(i, v)| if (i % chunk) % row_len < mid { v + 1.0 } else { 2.0 * v })
                .collect();
            proptest::prop_assert_eq!(out, want);
        }
    }

    #[test]
    #[should_panic(expected = "handed back 1 values other than the 2")]
    fn write_rows_refuses_a_row_handed_back_short() {
        let mut part = [MaybeUninit::<f32>::uninit(); 4];
        write_rows(&mut part, 2, |_, row| zeroed(&mut row[..1]));
    }
}
