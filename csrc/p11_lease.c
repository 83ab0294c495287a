/*
 * p11_lease.c -- leases: who owns a token identity, and is that owner alive.
 *
 * Everything lives in the token's state directory (kc_options.state_dir,
 * 0700, made by the caller), shared by every process that uses the token:
 *
 *   lock                 flocked around every token operation (p11_session.c)
 *   owners/<owner id>    one per process owning token identities; the
 *                        process holds an exclusive flock on it for its
 *                        whole life, so the kernel itself says whether it
 *                        runs -- in any PID namespace, whatever its pid
 *   leases/<sha256(label)>  one per token identity, written under the token
 *                        lock before its objects are created: key id, mode
 *                        (owned, shared, held) and owners
 *
 * No token attribute is needed for ownership, so every token works (NSS
 * softoken refuses token data objects).  A lease that is missing, unreadable
 * or names an owner file this process cannot see means "cannot tell", and
 * that counts as alive.
 */
#define _GNU_SOURCE
#include "p11.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#define LEASE_MAGIC "keychain_ext-lease/2"
#define LEASE_FILE_MAX 8192

/* This process as an owner: one id, and per state directory the open,
 * flocked owner file.  Reset in a forked child (owner_atfork_child). */
typedef struct owner_file {
    struct owner_file *next;
    char *dir;
    int fd;
    long owned;              /* identities this process owns there */
} owner_file;

static pthread_mutex_t owner_lock = PTHREAD_MUTEX_INITIALIZER;
static char owner_id[OWNER_ID_LEN + 1];
static owner_file *owner_files;

void owner_atfork_prepare(void) { pthread_mutex_lock(&owner_lock); }
void owner_atfork_parent(void) { pthread_mutex_unlock(&owner_lock); }

/* The child is another owner: it must not keep its parent's owner files
 * (their flocks are the parent's life) nor its id. */
void owner_atfork_child(void)
{
    owner_file *o, *next;
    pthread_mutex_init(&owner_lock, NULL);
    for (o = owner_files; o; o = next) {
        next = o->next;
        close(o->fd);
        free(o->dir);
        free(o);
    }
    owner_files = NULL;
    owner_id[0] = 0;
}

static int path_in(char *out, size_t n, const char *dir, const char *sub,
                   const char *name)
{
    int w = snprintf(out, n, "%s/%s%s%s", dir, sub, name ? "/" : "",
                     name ? name : "");
    return w > 0 && (size_t)w < n;
}

/* dir/sub, created 0700 if missing. */
static int32_t ensure_subdir(const char *dir, const char *sub, kc_error *err)
{
    char path[4096];
    if (!path_in(path, sizeof path, dir, sub, NULL))
        return fail(err, KC_errSecParam, 0, "state directory path too long");
    struct stat st;
    int fd;
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return fail(err, KC_errSecIO, errno, "cannot create %s: %s", path,
                    strerror(errno));
    /* not a symlink someone planted, and the caller's own */
    fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_uid != geteuid()) {
        if (fd >= 0)
            close(fd);
        return fail(err, KC_errSecIO, errno, "%s is not a directory of this user", path);
    }
    close(fd);
    return KC_errSecSuccess;
}

static void host_name(char *out, size_t n)
{
    if (gethostname(out, n) != 0 || !out[0])
        snprintf(out, n, "unknown");
    out[n - 1] = 0;
    out[strcspn(out, " \t\n")] = 0;
}

static void to_hex(const unsigned char *bytes, size_t n, char *out)
{
    size_t i;
    for (i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", bytes[i]);
    out[2 * n] = 0;
}

static int from_hex(const char *hex, unsigned char *out, size_t n)
{
    size_t i;
    unsigned int byte;
    if (strlen(hex) != 2 * n)
        return 0;
    for (i = 0; i < n; i++) {
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1)
            return 0;
        out[i] = (unsigned char)byte;
    }
    return 1;
}

/* Attach this process as an owner in the handle's state directory: its
 * owner file exists and is flocked by us.  *me names us. */
static int32_t owner_attach(kc_keychain *kc, owner_ref *me, kc_error *err)
{
    unsigned char raw[OWNER_ID_LEN / 2];
    char path[4096];
    owner_file *o;
    int32_t st = KC_errSecSuccess;
    int fd;

    pthread_mutex_lock(&owner_lock);
    if (!owner_id[0]) {
        if (RAND_bytes(raw, sizeof raw) != 1) {
            st = fail(err, KC_errSecAllocate, 0, "no random bytes for an owner id");
            goto out;
        }
        to_hex(raw, sizeof raw, owner_id);
    }
    for (o = owner_files; o; o = o->next)
        if (strcmp(o->dir, kc->state_dir) == 0)
            break;
    if (!o) {
        if ((st = ensure_subdir(kc->state_dir, "owners", err)))
            goto out;
        if (!path_in(path, sizeof path, kc->state_dir, "owners", owner_id)) {
            st = fail(err, KC_errSecParam, 0, "state directory path too long");
            goto out;
        }
        fd = open_regular(AT_FDCWD, path, O_RDWR | O_CREAT, 0600);
        if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0) {
            st = fail(err, KC_errSecIO, errno, "cannot hold owner file %s: %s",
                      path, strerror(errno));
            if (fd >= 0)
                close(fd);
            goto out;
        }
        if (!(o = calloc(1, sizeof *o)) || !(o->dir = strdup(kc->state_dir))) {
            free(o);
            close(fd);
            st = fail(err, KC_errSecAllocate, 0, "out of memory");
            goto out;
        }
        o->fd = fd;
        o->next = owner_files;
        owner_files = o;
    }
    memset(me, 0, sizeof *me);
    snprintf(me->id, sizeof me->id, "%s", owner_id);
    me->pid = (long)getpid();
    host_name(me->host, sizeof me->host);
out:
    pthread_mutex_unlock(&owner_lock);
    return st;
}

/* This process gained (+1) or gave up (-1) an identity in the handle's
 * state directory; owning none, it removes its owner file.  Called under
 * the token lock, so no one is judging the file meanwhile. */
static void owner_count(kc_keychain *kc, int delta)
{
    char path[4096];
    owner_file *o, **link;
    pthread_mutex_lock(&owner_lock);
    for (link = &owner_files; (o = *link); link = &o->next)
        if (strcmp(o->dir, kc->state_dir) == 0)
            break;
    if (o && (o->owned += delta) <= 0) {
        if (path_in(path, sizeof path, kc->state_dir, "owners", owner_id))
            unlink(path);
        close(o->fd);
        *link = o->next;
        free(o->dir);
        free(o);
    }
    pthread_mutex_unlock(&owner_lock);
}

int is_me(const owner_ref *o)
{
    int me;
    pthread_mutex_lock(&owner_lock);
    me = owner_id[0] && strcmp(o->id, owner_id) == 0;
    pthread_mutex_unlock(&owner_lock);
    return me;
}

/* 1 the owner runs, 0 it is dead, -1 cannot tell. */
static int owner_alive(kc_keychain *kc, const owner_ref *o)
{
    char path[4096];
    int fd, alive;
    if (is_me(o))
        return 1;
    if (strspn(o->id, "0123456789abcdef") != OWNER_ID_LEN ||
        !path_in(path, sizeof path, kc->state_dir, "owners", o->id))
        return -1;
    if ((fd = open_regular(AT_FDCWD, path, O_RDONLY, 0)) < 0)
        return -1; /* another host or mount namespace, not a file: cannot tell */
    if (flock(fd, LOCK_EX | LOCK_NB) == 0)
        alive = 0; /* nobody holds it: its process has ended */
    else
        alive = errno == EWOULDBLOCK ? 1 : -1;
    close(fd);
    return alive;
}

int lease_alive(kc_keychain *kc, const lease *l)
{
    int i, a, verdict = 0;
    if (l->held)
        return 1;
    if (l->unreadable)
        return -1;
    for (i = 0; i < l->n_owners; i++) {
        a = owner_alive(kc, &l->owners[i]);
        if (a == 1)
            return 1;
        if (a < 0)
            verdict = -1;
    }
    return verdict;
}

int lease_mine(const lease *l)
{
    int i;
    for (i = 0; i < l->n_owners; i++)
        if (is_me(&l->owners[i]))
            return 1;
    return 0;
}

/* Drop the owners that are dead (and this process, with leave). */
static int drop_owners(kc_keychain *kc, lease *l, int leave)
{
    int i, j = 0, mine = 0;
    for (i = 0; i < l->n_owners; i++) {
        if (is_me(&l->owners[i])) {
            mine = 1;
            if (leave)
                continue;
        } else if (owner_alive(kc, &l->owners[i]) == 0) {
            continue;
        }
        l->owners[j++] = l->owners[i];
    }
    l->n_owners = j;
    return mine;
}

void lease_prune(kc_keychain *kc, lease *l) { drop_owners(kc, l, 0); }

/* This process gives the identity up (and the dead owners go too); 1 if
 * it was an owner.  Once the lease is written or removed, the caller calls
 * lease_released: until then the owner file must stay, or a crash in
 * between would leave a lease naming an owner no one can judge. */
int lease_leave(kc_keychain *kc, lease *l) { return drop_owners(kc, l, 1); }

void lease_released(kc_keychain *kc) { owner_count(kc, -1); }

/* Add this process as an owner. */
int32_t lease_join(kc_keychain *kc, lease *l, kc_error *err)
{
    int32_t st;
    if (l->n_owners == MAX_OWNERS)
        return fail(err, KC_errSecAllocate, 0,
                    "the identity labelled '%s' has %d owners already",
                    l->label, MAX_OWNERS);
    if ((st = owner_attach(kc, &l->owners[l->n_owners], err)))
        return st;
    l->n_owners++;
    return KC_errSecSuccess;
}

/* After lease_join, the write failed: we do not own it after all. */
void lease_unjoin(kc_keychain *kc) { owner_count(kc, 0); }

/* After lease_join, the lease is written: count it. */
void lease_joined(kc_keychain *kc) { owner_count(kc, +1); }

static int lease_path(kc_keychain *kc, const char *label, char *out, size_t n)
{
    unsigned char digest[SHA256_DIGEST_LENGTH];
    char name[2 * SHA256_DIGEST_LENGTH + 1];
    SHA256((const unsigned char *)label, strlen(label), digest);
    to_hex(digest, sizeof digest, name);
    return path_in(out, n, kc->state_dir, "leases", name);
}

static int parse_lease(char *text, lease *l)
{
    char *line, *save = NULL, hex[2 * KC_LABEL_MAX + 1], word[16];
    owner_ref *o;
    int got_label = 0, got_id = 0, got_mode = 0;

    line = strtok_r(text, "\n", &save);
    if (!line || strcmp(line, LEASE_MAGIC) != 0)
        return 0;
    while ((line = strtok_r(NULL, "\n", &save))) {
        if (sscanf(line, "label %510s", hex) == 1) {
            size_t n = strlen(hex) / 2;
            got_label = n < KC_LABEL_MAX &&
                        from_hex(hex, (unsigned char *)l->label, n);
            l->label[got_label ? n : 0] = 0;
        } else if (sscanf(line, "key_id %40s", hex) == 1) {
            got_id = from_hex(hex, l->key_id, sizeof l->key_id);
        } else if (sscanf(line, "mode %15s", word) == 1) {
            got_mode = 1;
            l->held = strcmp(word, "held") == 0;
            l->shared = strcmp(word, "shared") == 0;
        } else if (strncmp(line, "owner ", 6) == 0 && l->n_owners < MAX_OWNERS) {
            o = &l->owners[l->n_owners];
            if (sscanf(line, "owner %32s %ld %63s", o->id, &o->pid, o->host) != 3)
                return 0;
            l->n_owners++;
        }
    }
    return got_label && got_id && got_mode;
}

/* Read and parse the lease file open on fd, and close it; one that cannot
 * be parsed is marked unreadable (cannot tell whose: alive). */
static void load_lease(int fd, lease *l)
{
    char text[LEASE_FILE_MAX];
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    memset(l, 0, sizeof *l);
    text[n > 0 ? n : 0] = 0;
    if (n <= 0 || !parse_lease(text, l)) {
        memset(l, 0, sizeof *l);
        l->unreadable = 1;
    }
}

int32_t lease_read(kc_keychain *kc, const char *label, lease *l, int *found,
                   kc_error *err)
{
    char path[4096];
    int fd;

    memset(l, 0, sizeof *l);
    *found = 0;
    if (!kc->state_dir)
        return KC_errSecSuccess;
    if (!lease_path(kc, label, path, sizeof path))
        return fail(err, KC_errSecParam, 0, "state directory path too long");
    if ((fd = open_regular(AT_FDCWD, path, O_RDONLY, 0)) < 0) {
        if (errno == ENOENT)
            return KC_errSecSuccess;
        return fail(err, KC_errSecIO, errno, "cannot read lease %s: %s", path,
                    strerror(errno));
    }
    *found = 1;
    load_lease(fd, l);
    if (!l->unreadable && strcmp(l->label, label) != 0) {
        memset(l, 0, sizeof *l);
        l->unreadable = 1;
    }
    snprintf(l->label, sizeof l->label, "%s", label);
    return KC_errSecSuccess;
}

/* Replace the lease atomically (write a temporary file, rename). */
int32_t lease_write(kc_keychain *kc, const lease *l, kc_error *err)
{
    char path[4096], tmp[4200], text[LEASE_FILE_MAX], hex[2 * KC_LABEL_MAX + 1];
    size_t len;
    int fd, i, ok;
    int32_t st;

    if ((st = ensure_subdir(kc->state_dir, "leases", err)))
        return st;
    if (!lease_path(kc, l->label, path, sizeof path))
        return fail(err, KC_errSecParam, 0, "state directory path too long");
    to_hex((const unsigned char *)l->label, strlen(l->label), hex);
    len = (size_t)snprintf(text, sizeof text, LEASE_MAGIC "\nlabel %s\nkey_id ",
                           hex);
    to_hex(l->key_id, sizeof l->key_id, text + len);
    len = strlen(text);
    len += (size_t)snprintf(text + len, sizeof text - len, "\nmode %s\n",
                            l->held ? "held" : l->shared ? "shared" : "owned");
    for (i = 0; i < l->n_owners && len < sizeof text; i++)
        len += (size_t)snprintf(text + len, sizeof text - len, "owner %s %ld %s\n",
                                l->owners[i].id, l->owners[i].pid,
                                l->owners[i].host);
    if (len >= sizeof text)
        return fail(err, KC_errSecAllocate, 0, "lease too large");
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    fd = open_regular(AT_FDCWD, tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return fail(err, KC_errSecIO, errno, "cannot write lease %s: %s", tmp,
                    strerror(errno));
    ok = write(fd, text, len) == (ssize_t)len;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        st = fail(err, KC_errSecIO, errno, "cannot write lease %s: %s", path,
                  strerror(errno));
        unlink(tmp);
        return st;
    }
    return KC_errSecSuccess;
}

int32_t lease_remove(kc_keychain *kc, const char *label, kc_error *err)
{
    char path[4096];
    if (!lease_path(kc, label, path, sizeof path))
        return fail(err, KC_errSecParam, 0, "state directory path too long");
    if (unlink(path) != 0 && errno != ENOENT)
        return fail(err, KC_errSecIO, errno, "cannot remove lease %s: %s",
                    path, strerror(errno));
    return KC_errSecSuccess;
}

/* Every lease in the state directory, read once: *out is malloc'ed, the
 * caller frees.  Unreadable ones are included, marked (their label is not
 * known). */
int32_t lease_all(kc_keychain *kc, lease **out, size_t *n, kc_error *err)
{
    char path[4096];
    lease *leases = NULL, *grown;
    struct dirent *e;
    DIR *d;
    int fd;

    *out = NULL;
    *n = 0;
    if (!kc->state_dir || !path_in(path, sizeof path, kc->state_dir, "leases", NULL) ||
        !(d = opendir(path)))
        return KC_errSecSuccess;
    while ((e = readdir(d))) {
        if (strlen(e->d_name) != 2 * SHA256_DIGEST_LENGTH)
            continue; /* ".", "..", temporary files */
        if ((fd = open_regular(dirfd(d), e->d_name, O_RDONLY, 0)) < 0)
            continue; /* gone, or not a file keychain_ext wrote */
        if (!(grown = realloc(leases, (*n + 1) * sizeof *leases))) {
            close(fd);
            free(leases);
            closedir(d);
            *n = 0;
            return fail(err, KC_errSecAllocate, 0, "out of memory");
        }
        leases = grown;
        load_lease(fd, &leases[(*n)++]);
    }
    closedir(d);
    *out = leases;
    return KC_errSecSuccess;
}

/* Remove the owner files of processes that have ended and that no lease
 * names any more (an unreadable lease might name any: then none goes);
 * *removed counts them. */
int32_t sweep_owner_files(kc_keychain *kc, CK_ULONG *removed, kc_error *err)
{
    char path[4096];
    struct dirent *e;
    lease *leases = NULL;
    owner_ref o;
    size_t n = 0, i;
    int named, j;
    int32_t st;
    DIR *d;

    *removed = 0;
    if (!kc->state_dir || !path_in(path, sizeof path, kc->state_dir, "owners", NULL))
        return KC_errSecSuccess;
    if ((st = lease_all(kc, &leases, &n, err)))
        return st;
    if (!(d = opendir(path))) {
        free(leases);
        return KC_errSecSuccess;
    }
    while ((e = readdir(d))) {
        memset(&o, 0, sizeof o);
        if (strlen(e->d_name) != OWNER_ID_LEN)
            continue;
        snprintf(o.id, sizeof o.id, "%s", e->d_name);
        if (owner_alive(kc, &o) != 0)
            continue;
        for (i = 0, named = 0; i < n && !named; i++) {
            named = leases[i].unreadable;
            for (j = 0; j < leases[i].n_owners; j++)
                named |= strcmp(leases[i].owners[j].id, o.id) == 0;
        }
        if (!named && unlinkat(dirfd(d), e->d_name, 0) == 0)
            ++*removed;
    }
    closedir(d);
    free(leases);
    return KC_errSecSuccess;
}

/* Describe the lease in *info (ownership fields). */
void lease_describe(kc_keychain *kc, const lease *l, kc_item_info *info)
{
    int i, a;
    info->ours = 1;
    info->held = l->held;
    info->shared = l->shared;
    info->owners = l->n_owners;
    info->mine = lease_mine(l);
    info->owner_alive = lease_alive(kc, l);
    info->owner_pid = 0;
    info->owner_host[0] = 0;
    for (i = 0; i < l->n_owners; i++) {
        a = owner_alive(kc, &l->owners[i]);
        if (i == 0 || a == 1) {
            info->owner_pid = l->owners[i].pid;
            snprintf(info->owner_host, sizeof info->owner_host, "%s",
                     l->owners[i].host);
        }
        if (a == 1)
            break;
    }
}

static const char *verdict(int alive)
{
    return alive > 0 ? "running" : alive == 0 ? "dead" : "cannot tell";
}

/* Fail with status, naming who holds the identity the lease describes. */
int32_t fail_owned(const lease *l, int alive, const char *why, int32_t status,
                   kc_error *err)
{
    if (l->held)
        return fail(err, status, 0,
                    "an identity labelled '%s' is already in the store, held "
                    "until it is killed; %s", l->label, why);
    return fail(err, status, 0,
                "an identity labelled '%s' is already in the store, owned by "
                "process %ld on %s (%s); %s", l->label,
                l->n_owners ? l->owners[0].pid : 0L,
                l->n_owners ? l->owners[0].host : "?", verdict(alive), why);
}

/* On an exclusive store, remove the blank objects a crash left, and the
 * owner files of ended processes.  *removed counts both. */
int32_t sweep_crash_leftovers(kc_keychain *kc, CK_ULONG *removed,
                              kc_error *err)
{
    CK_ULONG files = 0;
    int32_t st;
    *removed = 0;
    if (!kc->exclusive)
        return fail(err, KC_errSecInvalidOwnerEdit, 0,
                    "objects without a label on this token cannot be proven "
                    "keychain_ext's: left alone");
    if (!(st = remove_all_blanks(kc, removed, err)) &&
        !(st = sweep_owner_files(kc, &files, err)))
        *removed += files;
    return st;
}
