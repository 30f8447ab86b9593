/*
 * omv-idmap: bind a directory somewhere else with its file owners shifted (an idmapped mount).
 *
 *   omv-idmap [--rw] [--suid] [--dev] SOURCE TARGET FROM_ID TO_ID COUNT
 *
 * Binds SOURCE (that one mount, not the mounts below it) at TARGET, an existing directory, so that
 * a file whose owner or group is stored on disk as FROM_ID+n (0 <= n < COUNT) is seen through
 * TARGET as TO_ID+n, for uids and gids alike. Files owned by ids outside that range show as the
 * overflow id (65534, "nobody"). Nothing on disk changes; the shift lives in the mount.
 *
 *   omv-idmap /img /mnt/x 2000000000 0 65536   files stored as 2000000000+n appear as n (an image
 *                                              exported by a build in a user namespace, shown
 *                                              with container ids)
 *   omv-idmap /img /mnt/x 0 2000000000 65536   files stored as n appear as 2000000000+n (an image
 *                                              with plain container ids, shown to an app whose
 *                                              user namespace maps container id n to that id)
 *
 * The mount is read-only, nosuid and nodev unless --rw, --suid or --dev says otherwise: it is
 * meant as the read-only lower layer of a sandbox root, and a setuid file or a device node in an
 * image must never mean anything to the host. (A sandbox that runs the image's setuid files, such
 * as gVisor, which applies the mode bits itself, still sees them: nosuid only stops the host
 * kernel from honouring them on exec through this mount.)
 *
 * The mount is made in the caller's mount namespace: callers run this in a private one (unshare
 * -m) so that the mount vanishes with it. Needs CAP_SYS_ADMIN and CAP_SETUID/CAP_SETGID in the
 * initial user namespace (root), Linux >= 5.12, and a filesystem that supports idmapped mounts
 * (ext4, xfs, btrfs, tmpfs >= 6.3, overlayfs >= 5.19, ...).
 *
 * Exit status: 0 mounted; 2 bad usage; 1 anything else, with the reason on stderr.
 *
 * How: the kernel shifts ids through a user namespace attached to the mount (mount_setattr with
 * MOUNT_ATTR_IDMAP). A file stored as host id K is shown as the id the namespace's uid_map maps
 * the inside id K to, so the namespace gets the map line "FROM_ID TO_ID COUNT". A user namespace
 * stays usable by its file descriptor after its last process is gone, so a child creates one and
 * waits while the parent writes its maps (a process may not write maps beyond its own ids into
 * its own namespace) and opens /proc/<child>/ns/user; then the child is killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/mount.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Raw syscalls: glibc only wraps these from 2.36, and its <sys/mount.h> clashes with
 * <linux/mount.h>, which has struct mount_attr since Linux 5.12's headers. */
static int sys_open_tree(int dfd, const char *path, unsigned int flags) {
    return (int)syscall(SYS_open_tree, dfd, path, flags);
}

static int sys_mount_setattr(int dfd, const char *path, unsigned int flags, struct mount_attr *attr) {
    return (int)syscall(SYS_mount_setattr, dfd, path, flags, attr, sizeof *attr);
}

static int sys_move_mount(int from_dfd, const char *from, int to_dfd, const char *to, unsigned int flags) {
    return (int)syscall(SYS_move_mount, from_dfd, from, to_dfd, to, flags);
}

static void usage(void) {
    fprintf(stderr,
            "usage: omv-idmap [--rw] [--suid] [--dev] SOURCE TARGET FROM_ID TO_ID COUNT\n"
            "  bind SOURCE at TARGET so that on-disk id FROM_ID+n appears as TO_ID+n (0 <= n < COUNT)\n");
}

/* An id or count: decimal, below 2^32 - 1 (which is no id: (uid_t)-1). */
static int parse_id(const char *text, uint32_t *out) {
    char *end;
    errno = 0;
    if (*text < '0' || *text > '9') return -1;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || *end || value >= UINT32_MAX) return -1;
    *out = (uint32_t)value;
    return 0;
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t length = (ssize_t)strlen(text);
    ssize_t written = write(fd, text, (size_t)length);
    int saved = errno;
    close(fd);
    errno = saved;
    return written == length ? 0 : -1;
}

/* A user namespace whose uid and gid maps are "FROM TO COUNT", as a file descriptor. */
static int make_userns(uint32_t from, uint32_t to, uint32_t count) {
    int ready[2], hold[2];
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(hold, O_CLOEXEC) < 0) {
        perror("omv-idmap: pipe");
        return -1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("omv-idmap: fork");
        return -1;
    }
    if (child == 0) {
        /* Report whether the namespace exists, then wait until the parent is done with it (its
         * end of `hold` closes, also when it dies). */
        close(ready[0]);
        close(hold[1]);
        char status = unshare(CLONE_NEWUSER) == 0 ? 0 : (char)errno;
        if (write(ready[1], &status, 1) != 1) _exit(1);
        char byte;
        while (read(hold[0], &byte, 1) < 0 && errno == EINTR) {
        }
        _exit(0);
    }
    close(ready[1]);
    close(hold[0]);
    int userns = -1;
    char status;
    ssize_t got;
    while ((got = read(ready[0], &status, 1)) < 0 && errno == EINTR) {
    }
    if (got != 1) {
        fprintf(stderr, "omv-idmap: the helper process died before making a user namespace\n");
    } else if (status != 0) {
        fprintf(stderr, "omv-idmap: cannot create a user namespace: %s\n", strerror(status));
    } else {
        char path[64], line[96];
        snprintf(line, sizeof line, "%" PRIu32 " %" PRIu32 " %" PRIu32 "\n", from, to, count);
        int failed = 0;
        for (const char *const *map = (const char *const[]){"uid_map", "gid_map", NULL}; *map; map++) {
            snprintf(path, sizeof path, "/proc/%d/%s", (int)child, *map);
            if (write_file(path, line) < 0) {
                fprintf(stderr, "omv-idmap: cannot write %s (\"%" PRIu32 " %" PRIu32 " %" PRIu32 "\"): %s\n",
                        path, from, to, count, strerror(errno));
                failed = 1;
                break;
            }
        }
        if (!failed) {
            snprintf(path, sizeof path, "/proc/%d/ns/user", (int)child);
            userns = open(path, O_RDONLY | O_CLOEXEC);
            if (userns < 0) fprintf(stderr, "omv-idmap: cannot open %s: %s\n", path, strerror(errno));
        }
    }
    close(hold[1]); /* lets the child exit */
    close(ready[0]);
    kill(child, SIGKILL);
    while (waitpid(child, NULL, 0) < 0 && errno == EINTR) {
    }
    return userns;
}

int main(int argc, char **argv) {
    uint64_t clear_attrs = 0;
    uint64_t set_attrs = MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
    int i = 1;
    for (; i < argc && argv[i][0] == '-' && argv[i][1] == '-'; i++) {
        uint64_t attr;
        if (!strcmp(argv[i], "--rw")) attr = MOUNT_ATTR_RDONLY;
        else if (!strcmp(argv[i], "--suid")) attr = MOUNT_ATTR_NOSUID;
        else if (!strcmp(argv[i], "--dev")) attr = MOUNT_ATTR_NODEV;
        else {
            usage();
            return 2;
        }
        set_attrs &= ~attr;
        clear_attrs |= attr; /* a bind mount starts with its source's flags: clear them outright */
    }
    if (argc - i != 5) {
        usage();
        return 2;
    }
    const char *source = argv[i], *target = argv[i + 1];
    uint32_t from, to, count;
    if (parse_id(argv[i + 2], &from) || parse_id(argv[i + 3], &to) || parse_id(argv[i + 4], &count) ||
        count == 0 || (uint64_t)from + count > UINT32_MAX || (uint64_t)to + count > UINT32_MAX) {
        fprintf(stderr, "omv-idmap: FROM_ID, TO_ID and COUNT must be decimal, COUNT > 0, and both "
                        "ranges below 4294967295\n");
        usage();
        return 2;
    }

    int userns = make_userns(from, to, count);
    if (userns < 0) return 1;
    /* A detached copy of the one mount at SOURCE: its attributes can be changed before anyone
     * sees it, so no process ever finds TARGET mounted without the shift. */
    int tree = sys_open_tree(AT_FDCWD, source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (tree < 0) {
        fprintf(stderr, "omv-idmap: cannot clone the mount at %s: %s\n", source, strerror(errno));
        return 1;
    }
    struct mount_attr attr = {
        .attr_set = set_attrs,
        .attr_clr = clear_attrs,
        .userns_fd = (uint64_t)userns,
    };
    if (sys_mount_setattr(tree, "", AT_EMPTY_PATH, &attr) < 0) {
        int saved = errno;
        fprintf(stderr, "omv-idmap: cannot make an idmapped mount of %s: %s%s\n", source, strerror(saved),
                saved == EINVAL ? " (does its filesystem support idmapped mounts?)" : "");
        return 1;
    }
    if (sys_move_mount(tree, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0) {
        fprintf(stderr, "omv-idmap: cannot mount at %s: %s\n", target, strerror(errno));
        return 1;
    }
    return 0;
}
