//! The host-side linear algebra LoRA's initialisations and combinations need (through
//! `faer`): thin SVD, a randomized low-rank SVD (torch's `svd_lowrank`), thin QR. Matrices are
//! row-major `f32` slices; SVDs are computed in `f32` as PyTorch computes PEFT's (2x faster than
//! in `f64`), QR and the randomized range finder in `f64`.

use faer::Mat;
use peft_core::{PeftError, Result};
use rand::{Rng, SeedableRng};

/// A row-major `rows × cols` matrix as a faer matrix.
fn to_mat(data: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j] as f64)
}

/// The leading `k` singular triplets: `U` `[rows, k]`, `S` `[k]` (non-increasing) and `Vᵀ`
/// `[k, cols]` (row-major), with `k ≤ min(rows, cols)`.
pub struct LowRank {
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    pub vt: Vec<f64>,
    pub k: usize,
}

fn low_rank_of(m: &Mat<f32>, k: usize) -> Result<LowRank> {
    let svd = m
        .thin_svd()
        .map_err(|e| PeftError::Other(format!("SVD did not converge: {e:?}")))?;
    let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
    let (rows, cols) = (m.nrows(), m.ncols());
    let k = k.min(rows.min(cols));
    // faer sorts singular values in non-increasing order; sort explicitly all the same, the
    // factors' order is what PEFT's slices depend on.
    let mut order: Vec<usize> = (0..s.nrows()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    let order = &order[..k];
    let mut out = LowRank {
        u: vec![0.0; rows * k],
        s: order.iter().map(|&c| s[c] as f64).collect(),
        vt: vec![0.0; k * cols],
        k,
    };
    for (c, &src) in order.iter().enumerate() {
        for i in 0..rows {
            out.u[i * k + c] = u[(i, src)] as f64;
        }
        for j in 0..cols {
            out.vt[c * cols + j] = v[(j, src)] as f64;
        }
    }
    Ok(out)
}

/// `B·A` of the row-major `B` `[rows, k]` and `A` `[k, cols]`, row-major, in `f64`.
pub fn product(b: &[f32], a: &[f32], rows: usize, k: usize, cols: usize) -> Vec<f64> {
    let bm = Mat::<f64>::from_fn(rows, k, |i, j| b[i * k + j] as f64);
    let am = Mat::<f64>::from_fn(k, cols, |i, j| a[i * cols + j] as f64);
    let p = &bm * &am;
    (0..rows * cols).map(|x| p[(x / cols, x % cols)]).collect()
}

/// The leading `k` singular triplets of the row-major `rows × cols` `data` (a full thin SVD).
pub fn svd(data: &[f32], rows: usize, cols: usize, k: usize) -> Result<LowRank> {
    low_rank_of(&Mat::from_fn(rows, cols, |i, j| data[i * cols + j]), k)
}

/// Thin QR: `Q` `[rows, k]` and `R` `[k, cols]` (row-major, `k = min(rows, cols)`), `Q·R = A`.
pub fn qr(data: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let m = to_mat(data, rows, cols);
    let qr = m.qr();
    let q = qr.compute_thin_Q();
    let r = qr.thin_R();
    let k = rows.min(cols);
    let mut qv = vec![0.0; rows * k];
    let mut rv = vec![0.0; k * cols];
    for i in 0..rows {
        for c in 0..k {
            qv[i * k + c] = q[(i, c)];
        }
    }
    for c in 0..k {
        for j in 0..cols {
            rv[c * cols + j] = r[(c, j)];
        }
    }
    (qv, rv, k)
}

/// An orthonormal basis of the columns of `m` (thin Q).
fn orthonormal(m: &Mat<f64>) -> Mat<f64> {
    m.qr().compute_thin_Q()
}

/// The leading `k` singular triplets by a randomized range finder with `niter` power
/// iterations (Halko et al., as torch's `svd_lowrank(A, q=k, niter)`): `Q = orth(A·G)` for a
/// Gaussian `G` `[cols, k]`, refined `niter` times through `Aᵀ` and `A`, then the SVD of the
/// small `Qᵀ·A`. The sketch is drawn from `seed`.
pub fn randomized_svd(
    data: &[f32],
    rows: usize,
    cols: usize,
    k: usize,
    niter: usize,
    seed: u64,
) -> Result<LowRank> {
    let a = to_mat(data, rows, cols);
    let k = k.min(rows.min(cols));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Standard normal entries (Box–Muller).
    let mut normal = || {
        let (u1, u2): (f64, f64) = (rng.random(), rng.random());
        (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let g = Mat::from_fn(cols, k, |_, _| normal());
    let mut q = orthonormal(&(&a * &g));
    for _ in 0..niter {
        let z = orthonormal(&(a.transpose() * &q));
        q = orthonormal(&(&a * &z));
    }
    let small = q.transpose() * &a;
    let mut lr = low_rank_of(
        &Mat::from_fn(small.nrows(), small.ncols(), |i, j| small[(i, j)] as f32),
        k,
    )?;
    // U = Q · U_small.
    let u_small = Mat::from_fn(lr.k, lr.k, |i, j| lr.u[i * lr.k + j]);
    let u = &q * &u_small;
    lr.u = (0..rows * lr.k).map(|x| u[(x / lr.k, x % lr.k)]).collect();
    Ok(lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(lr: &LowRank, rows: usize, cols: usize) -> Vec<f64> {
        let mut p = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                p[i * cols + j] = (0..lr.k)
                    .map(|c| lr.u[i * lr.k + c] * lr.s[c] * lr.vt[c * cols + j])
                    .sum();
            }
        }
        p
    }

    #[test]
    fn full_rank_svd_and_qr_reconstruct_the_matrix() {
        let (rows, cols) = (7, 5);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let lr = svd(&data, rows, cols, 5).unwrap();
        assert!(lr.s.windows(2).all(|w| w[0] >= w[1]));
        // The SVD runs in f32.
        for (x, y) in product(&lr, rows, cols).iter().zip(&data) {
            assert!((x - *y as f64).abs() < 1e-5);
        }
        let (q, r, k) = qr(&data, rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                let v: f64 = (0..k).map(|c| q[i * k + c] * r[c * cols + j]).sum();
                assert!((v - data[i * cols + j] as f64).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn randomized_svd_finds_an_exact_low_rank() {
        // A rank-2 matrix: the randomized SVD with k = 2 recovers it.
        let (rows, cols) = (30, 20);
        let data: Vec<f32> = (0..rows * cols)
            .map(|x| {
                let (i, j) = ((x / cols) as f32, (x % cols) as f32);
                (i * 0.1).sin() * (j * 0.3).cos() + 0.5 * (i * 0.05).cos() * (j * 0.2 + 1.0).sin()
            })
            .collect();
        let lr = randomized_svd(&data, rows, cols, 2, 2, 7).unwrap();
        let exact = svd(&data, rows, cols, 2).unwrap();
        for (a, b) in lr.s.iter().zip(&exact.s) {
            assert!((a - b).abs() < 1e-4 * b, "{a} vs {b}");
        }
        for (x, y) in product(&lr, rows, cols).iter().zip(&data) {
            assert!((x - *y as f64).abs() < 1e-4);
        }
    }
}
