//! Weight buffers backed by 2 MiB pages where the kernel has them.
//!
//! Decoding reads every weight once per token, so its speed is the speed of streaming the
//! weights from memory. With 4 KiB pages that stream crosses a page (and its TLB entry) every
//! 4 KiB; on the 2-core development VM, two threads read 1 GiB at 47 GB/s on 4 KiB pages and at
//! 61-68 GB/s on 2 MiB pages. Linux gives anonymous memory huge pages only where a program asks
//! (`transparent_hugepage=madvise`, the usual default), and only to pages faulted after it asked:
//! so weight buffers are allocated, advised, and only then filled.

/// An empty vector with room for `capacity` elements, its pages advised to be huge before
/// anything touches them.
pub fn vec_with_capacity<T>(capacity: usize) -> Vec<T> {
    let v = Vec::<T>::with_capacity(capacity);
    advise(v.as_ptr().cast(), capacity * std::mem::size_of::<T>());
    v
}

/// An empty vector like [`vec_with_capacity`]'s, whose pages are already faulted in on every
/// core: for buffers then filled one element at a time on one thread, which would otherwise
/// spend most of their time in the kernel zeroing pages.
pub fn vec_prefaulted<T: Copy + Default + Send + Sync>(capacity: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut v = vec_with_capacity(capacity);
    let per_huge_page = ((2 << 20) / std::mem::size_of::<T>().max(1)).max(1);
    v.spare_capacity_mut()
        .par_chunks_mut(per_huge_page)
        .for_each(|chunk| {
            for slot in chunk {
                slot.write(T::default());
            }
        });
    v
}

/// `len` default values in a buffer advised as [`vec_with_capacity`] is. The pages are first
/// touched on every core: faulting in a huge page (finding and zeroing 2 MiB) is most of what
/// loading costs once the file is cached.
pub fn filled<T: Copy + Default + Send + Sync>(len: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut v = vec_with_capacity(len);
    let per_huge_page = ((2 << 20) / std::mem::size_of::<T>().max(1)).max(1);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(per_huge_page)
        .for_each(|chunk| {
            for slot in chunk {
                slot.write(T::default());
            }
        });
    // SAFETY: `len <= capacity` (`vec_with_capacity(len)`), and the first `len` slots were all
    // initialised just above (`spare_capacity_mut()[..len]`).
    unsafe { v.set_len(len) };
    v
}

#[cfg(target_os = "linux")]
fn advise(ptr: *const u8, bytes: usize) {
    const PAGE: usize = 4096;
    const HUGE_PAGE: usize = 2 << 20;
    if bytes < HUGE_PAGE {
        return;
    }
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + bytes) & !(PAGE - 1);
    if end > start {
        // SAFETY: `start .. end` is `ptr .. ptr + bytes` rounded inward to whole 4 KiB pages, so
        // it lies inside the vector's allocation, which this process owns; MADV_HUGEPAGE changes
        // how its pages are backed, never their contents. A refusal (no THP in this kernel,
        // `transparent_hugepage=never`) leaves 4 KiB pages, which are correct, only slower.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *const u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_what_is_written() {
        let mut v: Vec<u16> = filled(3 << 20);
        assert!(v.iter().all(|&x| x == 0));
        v[12345] = 7;
        assert_eq!(v.iter().map(|&x| x as u64).sum::<u64>(), 7);
        let mut w: Vec<f32> = vec_with_capacity(10);
        w.extend([1.0, 2.0]);
        assert_eq!(w, [1.0, 2.0]);
        let mut p: Vec<u8> = vec_prefaulted(5 << 20);
        assert!(p.is_empty() && p.capacity() >= 5 << 20);
        p.extend([3, 4]);
        assert_eq!(p, [3, 4]);
    }
}
