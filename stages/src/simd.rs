//! Runtime choice of vector width for the crate's hand-written f32 loops.

/// Defines `fn name` twice over one body: compiled for AVX2 + FMA, taken when the CPU has
/// them (checked once, cached by std), and portable (the x86-64 baseline is SSE2, 4 lanes).
/// Enabling FMA lets LLVM use it where the body calls `mul_add`; it never fuses a separate
/// `*` and `+` (Rust does not contract), so both versions round alike.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn portable($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: `wide` needs only AVX2 and FMA, which the CPU has.
                    return unsafe { wide($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use multiversion;
