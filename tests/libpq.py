"""libpq's own fast-path interface (PQfn), through ctypes: the client every FunctionCall test
uses, as psql's large-object commands and libpq applications do."""
import ctypes
import ctypes.util

PGRES_COMMAND_OK, PGRES_FATAL_ERROR, CONNECTION_OK = 1, 7, 0
PG_DIAG_SQLSTATE = ord("C")
RESULT_BUFFER = 8192


class _ArgValue(ctypes.Union):
    _fields_ = [("ptr", ctypes.c_void_p), ("integer", ctypes.c_int)]


class PQArgBlock(ctypes.Structure):
    _fields_ = [("len", ctypes.c_int), ("isint", ctypes.c_int), ("u", _ArgValue)]


def _libpq():
    lib = ctypes.CDLL(ctypes.util.find_library("pq") or "libpq.so.5")
    lib.PQconnectdb.restype = ctypes.c_void_p
    lib.PQconnectdb.argtypes = [ctypes.c_char_p]
    lib.PQstatus.argtypes = [ctypes.c_void_p]
    lib.PQerrorMessage.restype = ctypes.c_char_p
    lib.PQerrorMessage.argtypes = [ctypes.c_void_p]
    lib.PQfn.restype = ctypes.c_void_p
    lib.PQfn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                         ctypes.c_int, ctypes.POINTER(PQArgBlock), ctypes.c_int]
    lib.PQresultStatus.argtypes = [ctypes.c_void_p]
    lib.PQresultErrorField.restype = ctypes.c_char_p
    lib.PQresultErrorField.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.PQclear.argtypes = [ctypes.c_void_p]
    lib.PQfinish.argtypes = [ctypes.c_void_p]
    return lib


class Libpq:
    """One libpq connection. `call_int(oid, *ints)`: PQfn with int4 arguments and an int4 result;
    `call_text(oid, *ints)`: the same with the result as bytes (text format). Each returns
    (value, None) or (None, SQLSTATE)."""

    def __init__(self, dsn: str):
        self.lib = _libpq()
        self.conn = self.lib.PQconnectdb(dsn.encode())
        if self.lib.PQstatus(self.conn) != CONNECTION_OK:
            message = self.lib.PQerrorMessage(self.conn).decode()
            self.lib.PQfinish(self.conn)
            raise RuntimeError(f"libpq could not connect: {message}")

    def call_int(self, oid: int, *args: int):
        result = ctypes.c_int(0)
        return self._call(oid, args, ctypes.byref(result), True, lambda n: result.value)

    def call_text(self, oid: int, *args: int):
        buf = ctypes.create_string_buffer(RESULT_BUFFER)
        return self._call(oid, args, buf, False, lambda n: buf.raw[:n])

    def _call(self, oid, args, result_buf, result_is_int, value_of):
        blocks = (PQArgBlock * max(1, len(args)))()
        for i, value in enumerate(args):
            blocks[i].len, blocks[i].isint, blocks[i].u.integer = 4, 1, value
        result_len = ctypes.c_int(0)
        res = self.lib.PQfn(self.conn, oid, result_buf, ctypes.byref(result_len), int(result_is_int), blocks,
                            len(args))
        try:
            status = self.lib.PQresultStatus(res)
            if status == PGRES_COMMAND_OK:
                return value_of(result_len.value), None
            assert status == PGRES_FATAL_ERROR, status
            return None, self.lib.PQresultErrorField(res, PG_DIAG_SQLSTATE).decode()
        finally:
            self.lib.PQclear(res)

    def close(self):
        self.lib.PQfinish(self.conn)
