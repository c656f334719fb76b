/* respreg._fileio: the file system calls of a group commit batch, made without the interpreter
 * lock.
 *
 * A Python thread gives up the interpreter lock for each system call it makes and must win it
 * back afterwards; behind a busy event loop each win can wait several milliseconds. A batch of a
 * few hundred key files means a few hundred writes and links, so the group committer's thread
 * could not make them itself and the event loop made them, with the lock held. These functions
 * make a whole batch's calls in one go, with the lock given up once (docs/design.md, *Group
 * commit*). storage.py works without this module (it is built only where a C compiler is).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#ifndef O_TMPFILE
#define O_TMPFILE 0
#endif
#ifndef __linux__
/* syncfs(2) is Linux's; storage.py uses syncfs mode only there. */
static int syncfs(int fd)
{
    (void)fd;
    errno = ENOSYS;
    return -1;
}
#endif
#ifndef AT_EMPTY_PATH
#define AT_EMPTY_PATH 0x1000
#endif

/* Phases of run_batch, in order (returned to say where a batch stopped). */
enum { PHASE_WRITE = 0, PHASE_SYNC_DATA = 1, PHASE_LINK = 2, PHASE_SYNC_NAMES = 3, PHASE_DONE = 4 };

/* How an unnamed file gets its name (storage.py's two linkers). */
enum { LINK_BY_DESCRIPTOR = 0, LINK_BY_PROC_PATH = 1 };

/* The descriptors of a list of ints, in a new array (PyMem_Free it); NULL with an exception set. */
static int *int_array(PyObject *list, Py_ssize_t n)
{
    int *out = PyMem_New(int, n > 0 ? n : 1);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PyList_GET_ITEM(list, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            return NULL;
        }
        if (v < INT_MIN || v > INT_MAX) {
            PyMem_Free(out);
            PyErr_SetString(PyExc_OverflowError, "descriptor out of range");
            return NULL;
        }
        out[i] = (int)v;
    }
    return out;
}

/* New references to the bytes objects of a list (so that nothing frees them while the lock is
 * given up), with their buffers and sizes; 0 on success, -1 with an exception set. */
static int hold_bytes(PyObject *list, Py_ssize_t n, PyObject **held, const char **bufs, Py_ssize_t *sizes)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyBytes_Check(item)) {
            for (Py_ssize_t j = 0; j < i; j++)
                Py_DECREF(held[j]);
            PyErr_SetString(PyExc_TypeError, "expected a list of bytes");
            return -1;
        }
        Py_INCREF(item);
        held[i] = item;
        bufs[i] = PyBytes_AS_STRING(item);
        sizes[i] = PyBytes_GET_SIZE(item);
    }
    return 0;
}

static int write_fully(int fd, const char *buf, Py_ssize_t size)
{
    while (size > 0) {
        ssize_t n = write(fd, buf, (size_t)size);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        buf += n;
        size -= n;
    }
    return 0;
}

static int link_unnamed(int fd, const char *path, int how)
{
    int rc;
    if (how == LINK_BY_DESCRIPTOR) {
        rc = linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH);
    } else {
        char source[64];
        snprintf(source, sizeof source, "/proc/self/fd/%d", fd);
        rc = linkat(AT_FDCWD, source, AT_FDCWD, path, AT_SYMLINK_FOLLOW);
    }
    return rc == 0 ? 0 : errno;
}

PyDoc_STRVAR(run_batch_doc,
"run_batch(fds, datas, paths, data_fd, names_fd, how, phase, index) -> (phase, index, errno)\n\n"
"From (phase, index) on: write datas[i] to fds[i] (phase 0), syncfs(data_fd) (1), link the\n"
"unnamed file fds[i] onto paths[i] (2; how: 0 on the descriptor, 1 through /proc/self/fd),\n"
"syncfs(names_fd) (3). Returns where it stopped: (4, len(fds), 0) when all is done, and then\n"
"every descriptor of fds and names_fd is closed; else the phase, the item and the errno of the\n"
"call that failed, with every descriptor still open. Gives up the interpreter lock meanwhile.");

static PyObject *run_batch(PyObject *self, PyObject *args)
{
    PyObject *fds_list, *datas_list, *paths_list;
    int data_fd, names_fd, how, phase;
    Py_ssize_t index;
    if (!PyArg_ParseTuple(args, "O!O!O!iiiin", &PyList_Type, &fds_list, &PyList_Type, &datas_list, &PyList_Type,
                          &paths_list, &data_fd, &names_fd, &how, &phase, &index))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(fds_list);
    if (PyList_GET_SIZE(datas_list) != n || PyList_GET_SIZE(paths_list) != n) {
        PyErr_SetString(PyExc_ValueError, "fds, datas and paths differ in length");
        return NULL;
    }
    if (phase < PHASE_WRITE || phase > PHASE_DONE || index < 0 || index > n
        || (how != LINK_BY_DESCRIPTOR && how != LINK_BY_PROC_PATH)) {
        PyErr_SetString(PyExc_ValueError, "bad phase, index or link mode");
        return NULL;
    }
    Py_ssize_t slots = n > 0 ? n : 1;
    int *fds = int_array(fds_list, n);
    PyObject **held = PyMem_New(PyObject *, 2 * slots);
    const char **bufs = PyMem_New(const char *, 2 * slots);
    Py_ssize_t *sizes = PyMem_New(Py_ssize_t, 2 * slots);
    PyObject *result = NULL;
    if (fds == NULL || held == NULL || bufs == NULL || sizes == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    if (hold_bytes(datas_list, n, held, bufs, sizes) < 0)
        goto done;
    if (hold_bytes(paths_list, n, held + n, bufs + n, sizes + n) < 0) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_DECREF(held[i]);
        goto done;
    }
    int err = 0;
    Py_ssize_t i = index;
    Py_BEGIN_ALLOW_THREADS
    for (; phase < PHASE_DONE && err == 0; phase++, i = 0) {
        switch (phase) {
        case PHASE_WRITE:
            for (; i < n && err == 0; i++)
                err = write_fully(fds[i], bufs[i], sizes[i]);
            break;
        case PHASE_SYNC_DATA:
            if (syncfs(data_fd) != 0)
                err = errno;
            break;
        case PHASE_LINK:
            for (; i < n && err == 0; i++)
                err = link_unnamed(fds[i], bufs[n + i], how);
            break;
        case PHASE_SYNC_NAMES:
            if (syncfs(names_fd) != 0)
                err = errno;
            break;
        }
        if (err != 0)
            break;
    }
    if (err == 0) {
        for (Py_ssize_t j = 0; j < n; j++)
            if (fds[j] >= 0)
                close(fds[j]);
        close(names_fd);
    }
    Py_END_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < 2 * n; j++)
        Py_DECREF(held[j]);
    if (err != 0) {
        /* The loops above stepped past the failed item. */
        Py_ssize_t at = (phase == PHASE_WRITE || phase == PHASE_LINK) ? i - 1 : 0;
        result = Py_BuildValue("(ini)", phase, at, err);
    } else {
        result = Py_BuildValue("(ini)", PHASE_DONE, n, 0);
    }
done:
    PyMem_Free(fds);
    PyMem_Free(held);
    PyMem_Free(bufs);
    PyMem_Free(sizes);
    return result;
}

PyDoc_STRVAR(create_unnamed_doc,
"create_unnamed(directory, count) -> list[int]\n\n"
"Up to count new unnamed files (O_TMPFILE) on directory's file system, open for writing. Stops\n"
"at the first failure; raises OSError if not even one was made. Gives up the interpreter lock\n"
"meanwhile.");

static PyObject *create_unnamed(PyObject *self, PyObject *args)
{
    PyObject *dir_obj;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "O&n", PyUnicode_FSConverter, &dir_obj, &count))
        return NULL;
    if (count < 1 || count > 65536) {
        Py_DECREF(dir_obj);
        PyErr_SetString(PyExc_ValueError, "count must be 1 to 65536");
        return NULL;
    }
    int *fds = PyMem_New(int, count);
    if (fds == NULL) {
        Py_DECREF(dir_obj);
        return PyErr_NoMemory();
    }
    const char *dir = PyBytes_AS_STRING(dir_obj);
    Py_ssize_t made = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; made < count; made++) {
        int fd = O_TMPFILE ? open(dir, O_WRONLY | O_TMPFILE | O_CLOEXEC, 0644) : (errno = EOPNOTSUPP, -1);
        if (fd < 0) {
            err = errno;
            break;
        }
        fds[made] = fd;
    }
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (made == 0) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, dir_obj);
    } else if ((result = PyList_New(made)) != NULL) {
        for (Py_ssize_t i = 0; i < made; i++) {
            PyObject *v = PyLong_FromLong(fds[i]);
            if (v == NULL) {
                for (Py_ssize_t j = i; j < made; j++)
                    close(fds[j]);
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, i, v);
        }
    } else {
        for (Py_ssize_t i = 0; i < made; i++)
            close(fds[i]);
    }
    Py_DECREF(dir_obj);
    PyMem_Free(fds);
    return result;
}

PyDoc_STRVAR(close_all_doc,
"close_all(fds) -> None\n\n"
"Close every descriptor of the list that is not negative, ignoring errors (a descriptor is\n"
"released even when close reports one). Gives up the interpreter lock meanwhile.");

static PyObject *close_all(PyObject *self, PyObject *arg)
{
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "expected a list of descriptors");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(arg);
    int *fds = int_array(arg, n);
    if (fds == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    Py_END_ALLOW_THREADS
    PyMem_Free(fds);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run_batch", run_batch, METH_VARARGS, run_batch_doc},
    {"create_unnamed", create_unnamed, METH_VARARGS, create_unnamed_doc},
    {"close_all", close_all, METH_O, close_all_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "respreg._fileio",
    .m_doc = "Batched file system calls made without the interpreter lock.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fileio(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "PHASE_WRITE", PHASE_WRITE) < 0
        || PyModule_AddIntConstant(m, "PHASE_SYNC_DATA", PHASE_SYNC_DATA) < 0
        || PyModule_AddIntConstant(m, "PHASE_LINK", PHASE_LINK) < 0
        || PyModule_AddIntConstant(m, "PHASE_SYNC_NAMES", PHASE_SYNC_NAMES) < 0
        || PyModule_AddIntConstant(m, "PHASE_DONE", PHASE_DONE) < 0
        || PyModule_AddIntConstant(m, "LINK_BY_DESCRIPTOR", LINK_BY_DESCRIPTOR) < 0
        || PyModule_AddIntConstant(m, "LINK_BY_PROC_PATH", LINK_BY_PROC_PATH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
