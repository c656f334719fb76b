/*
 * LD_PRELOAD shim for the disk-fault tests: makes fsync(2), fdatasync(2) and syncfs(2) fail with
 * EIO.
 *
 * A call fails only when the descriptor's path (readlink of /proc/self/fd/N) contains
 * RESPREG_FAIL_FSYNC_PATH and one of these holds:
 *   - the file named by RESPREG_FAIL_FSYNC_TRIGGER exists (so a process can start normally and
 *     the test "breaks the disk" later by creating that file, and repairs it by removing it),
 *     and RESPREG_FAIL_FSYNC_DIRS_ONLY is unset or "0", or the descriptor is a directory;
 *   - the file named by RESPREG_FAIL_FSYNC_DIRS_TRIGGER (optional) exists and the descriptor is
 *     a directory (so one process can have its files' or only its directories' fsyncs broken).
 * Every other call goes to the real function. Nothing is written anywhere by the shim.
 *
 * A slow disk: with RESPREG_SLOW_SYNC_MS set, every such call on a descriptor whose path contains
 * RESPREG_SLOW_SYNC_PATH first sleeps that many milliseconds (then fails or not as above).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int (*sync_fn)(int);

static int exists(const char *path)
{
    return path != NULL && path[0] != '\0' && access(path, F_OK) == 0;
}

static int is_dir(int fd)
{
    struct stat st;

    return fstat(fd, &st) == 0 && S_ISDIR(st.st_mode);
}

static int path_contains(int fd, const char *needle)
{
    char link[64];
    char target[4096];
    ssize_t n;

    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof target - 1);
    if (n < 0)
        return 0;
    target[n] = '\0';
    return strstr(target, needle) != NULL;
}

static int should_fail(int fd)
{
    const char *needle = getenv("RESPREG_FAIL_FSYNC_PATH");
    const char *dirs_only = getenv("RESPREG_FAIL_FSYNC_DIRS_ONLY");
    int all_broken, dirs_broken;

    if (needle == NULL || needle[0] == '\0')
        return 0;
    all_broken = exists(getenv("RESPREG_FAIL_FSYNC_TRIGGER"));
    dirs_broken = exists(getenv("RESPREG_FAIL_FSYNC_DIRS_TRIGGER"));
    if (!all_broken && !dirs_broken)
        return 0;
    if (!path_contains(fd, needle))
        return 0;
    if (all_broken && (dirs_only == NULL || strcmp(dirs_only, "0") == 0))
        return 1;
    return is_dir(fd);
}

static void maybe_slow(int fd)
{
    const char *ms = getenv("RESPREG_SLOW_SYNC_MS");
    const char *needle = getenv("RESPREG_SLOW_SYNC_PATH");

    if (ms == NULL || needle == NULL || needle[0] == '\0' || !path_contains(fd, needle))
        return;
    usleep((useconds_t)(atoi(ms) * 1000));
}

static int call_real(const char *name, int fd)
{
    sync_fn real = (sync_fn)dlsym(RTLD_NEXT, name);
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    return real(fd);
}

int fsync(int fd)
{
    maybe_slow(fd);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return call_real("fsync", fd);
}

int fdatasync(int fd)
{
    maybe_slow(fd);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return call_real("fdatasync", fd);
}

int syncfs(int fd)
{
    maybe_slow(fd);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    return call_real("syncfs", fd);
}
