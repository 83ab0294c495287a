/*
 * p11shim control API (test-only).  Load the shim's .so with ctypes in the
 * same process as the PKCS#11 user; both get the same copy of the state.
 *
 * Counted calls: every C_* except C_GetFunctionList.  Positions are 1-based
 * over all counted calls since the last p11shim_reset() (or since load).
 */
#ifndef P11SHIM_H
#define P11SHIM_H

#include <stddef.h>

/* Zero counters, total, fired and the trace.  Faults stay armed. */
void p11shim_reset(void);
/* Calls of one function ("C_FindObjectsInit"); ULONG_MAX for unknown names. */
unsigned long p11shim_count(const char *fname);
unsigned long p11shim_total(void);
/* How many injected faults have fired since the last reset. */
unsigned long p11shim_fired(void);
/* The n-th counted call returns rv without being forwarded; n = 0 disarms. */
void p11shim_fail_at(unsigned long n, unsigned long rv);
/* The k-th call of fname returns rv without being forwarded; k = 0 disarms.
 * One rule per function.  Returns -1 for an unknown name. */
int p11shim_fail_function(const char *fname, unsigned long k, unsigned long rv);
/* How many answers P11SHIM_LIE has bent since the last reset. */
unsigned long p11shim_lies(void);
/* Disarm fail_at and every fail_function rule. */
void p11shim_clear_faults(void);
/* "C_Name=count\n" for each function called since the reset (snprintf-like:
 * writes at most n bytes with the NUL, returns the full length needed). */
size_t p11shim_dump(char *buf, size_t n);
/* The names of the counted calls since the reset, in order, one per line
 * (same return convention; capped at 16M calls, counters stay exact). */
size_t p11shim_trace(char *buf, size_t n);

#endif
