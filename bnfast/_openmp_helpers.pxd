# OpenMP runtime calls that turn into serial no-ops when the compiler has no OpenMP
# (the scikit-learn pattern): code calls these names unconditionally.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNF_HAVE_OPENMP 1
    /* GNU's libgomp (gcc; not clang's libomp or Intel's), whose threads do not survive fork */
    #if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER) && \
        !defined(__INTEL_LLVM_COMPILER)
    #define BNF_GNU_OPENMP 1
    #else
    #define BNF_GNU_OPENMP 0
    #endif
    /* what a parallel region would get: the nthreads-var capped by OMP_THREAD_LIMIT */
    static int bnf_omp_max_threads(void) {
        int n = omp_get_max_threads(), lim = omp_get_thread_limit();
        return n < lim ? n : lim;
    }
    static int bnf_omp_thread_limit(void) { return omp_get_thread_limit(); }
    static int bnf_omp_version(void) { return _OPENMP; }
    static int bnf_omp_thread_num(void) { return omp_get_thread_num(); }
    #else
    #define BNF_HAVE_OPENMP 0
    #define BNF_GNU_OPENMP 0
    static int bnf_omp_max_threads(void) { return 1; }
    static int bnf_omp_thread_limit(void) { return 1; }
    static int bnf_omp_version(void) { return 0; }
    static int bnf_omp_thread_num(void) { return 0; }
    #endif
    """
    bint BNF_HAVE_OPENMP
    bint BNF_GNU_OPENMP
    int bnf_omp_max_threads() noexcept nogil
    int bnf_omp_thread_limit() noexcept nogil
    int bnf_omp_version() noexcept nogil
    int bnf_omp_thread_num() noexcept nogil
