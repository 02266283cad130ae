/* The bare C libfuse file system of bench phase (m): one file, whose write is one pwrite.
 *
 *   nullfs BACKING MOUNTPOINT [-m] [-w]
 *     -m  the multi-threaded loop (fuse_session_loop_mt), else the single-threaded one
 *     -w  the kernel's writeback cache (FUSE_CAP_WRITEBACK_CACHE)
 *
 * Serves BACKING as MOUNTPOINT/<its name> in the foreground until unmounted (or SIGTERM).
 * The same file system as nullfs.py beside it, on libfuse3's low-level API: what is left
 * of FUSE's cost without Python. Mounted with pyfuse3's default option
 * (default_permissions), attribute and entry timeouts of 1 s and keep_cache, as cowfs.
 *
 * Built by the bench at run time:
 *   gcc -O2 -Wall -o nullfs nullfs.c $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2
#define TIMEOUT 1.0

static int bfd = -1;
static int writeback;
static const char *name;

static int fill(fuse_ino_t ino, struct stat *st)
{
	struct stat b;

	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_blksize = 4096;
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	}
	if (ino != FILE_INO)
		return ENOENT;
	if (fstat(bfd, &b) < 0)
		return errno;
	st->st_mode = S_IFREG | 0644;
	st->st_nlink = 1;
	st->st_size = b.st_size;
	st->st_blocks = b.st_blocks;
	st->st_atim = b.st_atim;
	st->st_mtim = b.st_mtim;
	st->st_ctim = b.st_ctim;
	st->st_uid = getuid();
	st->st_gid = getgid();
	return 0;
}

static void n_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	if (writeback && (conn->capable & FUSE_CAP_WRITEBACK_CACHE))
		conn->want |= FUSE_CAP_WRITEBACK_CACHE;
	else
		conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static void n_lookup(fuse_req_t req, fuse_ino_t parent, const char *entry)
{
	struct fuse_entry_param e;
	int r;

	memset(&e, 0, sizeof(e));
	if (parent != FUSE_ROOT_ID || strcmp(entry, name)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	r = fill(FILE_INO, &e.attr);
	if (r) {
		fuse_reply_err(req, r);
		return;
	}
	e.ino = FILE_INO;
	e.attr_timeout = e.entry_timeout = TIMEOUT;
	fuse_reply_entry(req, &e);
}

static void n_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	int r = fill(ino, &st);

	(void)fi;
	if (r)
		fuse_reply_err(req, r);
	else
		fuse_reply_attr(req, &st, TIMEOUT);
}

static void n_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		      struct fuse_file_info *fi)
{
	if (ino == FILE_INO && (to_set & FUSE_SET_ATTR_SIZE) && ftruncate(bfd, attr->st_size) < 0) {
		fuse_reply_err(req, errno);
		return;
	}
	n_getattr(req, ino, fi);
}

static void n_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != FILE_INO) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	fi->fh = FILE_INO;
	fi->keep_cache = 1; /* pyfuse3's FileInfo default */
	fuse_reply_open(req, fi);
}

static void n_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		   struct fuse_file_info *fi)
{
	struct fuse_bufvec bv = FUSE_BUFVEC_INIT(size);

	(void)ino;
	(void)fi;
	bv.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
	bv.buf[0].fd = bfd;
	bv.buf[0].pos = off;
	fuse_reply_data(req, &bv, FUSE_BUF_SPLICE_MOVE);
}

static void n_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	ssize_t r = pwrite(bfd, buf, size, off);

	(void)ino;
	(void)fi;
	if (r < 0)
		fuse_reply_err(req, errno);
	else
		fuse_reply_write(req, r);
}

static void n_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	int r = datasync ? fdatasync(bfd) : fsync(bfd);

	(void)ino;
	(void)fi;
	fuse_reply_err(req, r < 0 ? errno : 0);
}

static void n_ok(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	(void)fi;
	fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
	.init = n_init,
	.lookup = n_lookup,
	.getattr = n_getattr,
	.setattr = n_setattr,
	.open = n_open,
	.read = n_read,
	.write = n_write,
	.fsync = n_fsync,
	.flush = n_ok,
	.release = n_ok,
};

int main(int argc, char **argv)
{
	char *fargv[] = { argv[0], "-o", "default_permissions,fsname=nullfs,subtype=nullfs", NULL };
	struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
	struct fuse_session *se;
	int mt = 0, ret = 1;

	if (argc < 3) {
		fprintf(stderr, "usage: %s BACKING MOUNTPOINT [-m] [-w]\n", argv[0]);
		return 2;
	}
	for (int i = 3; i < argc; i++) {
		if (!strcmp(argv[i], "-m")) {
			mt = 1;
		} else if (!strcmp(argv[i], "-w")) {
			writeback = 1;
		} else {
			fprintf(stderr, "%s: unknown option %s\n", argv[0], argv[i]);
			return 2;
		}
	}
	name = strrchr(argv[1], '/') ? strrchr(argv[1], '/') + 1 : argv[1];
	bfd = open(argv[1], O_RDWR);
	if (bfd < 0) {
		perror(argv[1]);
		return 1;
	}
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	if (!se)
		goto out_fd;
	if (fuse_set_signal_handlers(se))
		goto out_session;
	if (fuse_session_mount(se, argv[2]))
		goto out_signals;
	if (mt) {
		struct fuse_loop_config *cfg = fuse_loop_cfg_create();

		fuse_loop_cfg_set_clone_fd(cfg, 0);
		ret = fuse_session_loop_mt(se, cfg);
		fuse_loop_cfg_destroy(cfg);
	} else {
		ret = fuse_session_loop(se);
	}
	fuse_session_unmount(se);
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fuse_session_destroy(se);
out_fd:
	close(bfd);
	return ret ? 1 : 0;
}
