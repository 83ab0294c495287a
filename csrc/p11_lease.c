/*
 * p11_lease.c -- leases: which process owns a token identity, and whether
 * it still runs (a crash between preauth and kill leaves a dead owner).
 */
#define _GNU_SOURCE
#include "p11.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Start time of a process in clock ticks since boot (/proc/PID/stat field
 * 22); 0 if unknown. */
static unsigned long long start_time(long pid)
{
    char path[64], buf[1024], *p;
    unsigned long long start = 0;
    size_t n;
    FILE *f;
    int i;

    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (!(f = fopen(path, "re")))
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* the command name may hold spaces and ')': skip to the last ')' */
    if (!(p = strrchr(buf, ')')))
        return 0;
    for (i = 2; i < 22 && p; i++)
        p = strchr(p + 1, ' ');
    if (p)
        sscanf(p + 1, "%llu", &start);
    return start;
}

static void boot_id(char *out, size_t n)
{
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    out[0] = 0;
    if (f) {
        if (fgets(out, (int)n, f))
            out[strcspn(out, "\n")] = 0;
        fclose(f);
    }
    if (!out[0])
        snprintf(out, n, "unknown");
}

static void host_name(char *out, size_t n)
{
    if (gethostname(out, n) != 0 || !out[0])
        snprintf(out, n, "unknown");
    out[n - 1] = 0;
    out[strcspn(out, " \t\n")] = 0;
}

static void to_hex(const CK_BYTE *bytes, size_t n, char *out)
{
    size_t i;
    for (i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", bytes[i]);
    out[2 * n] = 0;
}

void make_lease(const CK_BYTE *key_id, char *out, size_t n)
{
    lease l;
    memset(&l, 0, sizeof l);
    boot_id(l.boot, sizeof l.boot);
    host_name(l.host, sizeof l.host);
    to_hex(key_id, SHA_DIGEST_LENGTH, l.key_id_hex);
    snprintf(out, n, "keychain_ext-lease/1 pid=%ld start=%llu boot=%s host=%s id=%s",
             (long)getpid(), start_time(getpid()), l.boot, l.host,
             l.key_id_hex);
}

int parse_lease(const object *o, lease *l)
{
    memset(l, 0, sizeof *l);
    return o->cls == CKO_DATA &&
           strcmp(o->application, LEASE_APPLICATION) == 0 &&
           sscanf((const char *)o->value,
                  "keychain_ext-lease/1 pid=%ld start=%llu boot=%39s "
                  "host=%127s id=%40s",
                  &l->pid, &l->start, l->boot, l->host, l->key_id_hex) == 5;
}

/* 1 the owner runs, 0 it is dead, -1 cannot tell (another host). */
int lease_alive(const lease *l)
{
    char boot[40], host[128];
    host_name(host, sizeof host);
    if (strcmp(host, l->host) != 0)
        return -1;
    boot_id(boot, sizeof boot);
    if (strcmp(boot, l->boot) != 0)
        return 0; /* rebooted since */
    if (kill((pid_t)l->pid, 0) != 0 && errno == ESRCH)
        return 0;
    /* a recycled pid has another start time */
    return start_time(l->pid) == l->start ? 1 : 0;
}
