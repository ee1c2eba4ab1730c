package nbd

import (
	"errors"
	"syscall"
)

// Wire constants from the NBD protocol (doc/proto.md in the
// NetworkBlockDevice/nbd repository). All integers are big-endian.
const (
	magicInit          = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt           = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply      = 0x3e889045565a9
	magicRequest       = 0x25609513
	magicSimpleReply   = 0x67446698
	magicStructReply   = 0x668e33ef
	requestHeaderBytes = 28
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	clientFlagFixedNewstyle = 1 << 0
	clientFlagNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option reply types.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4
	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrTLSReqd  = 1<<31 + 5
	repErrUnknown  = 1<<31 + 6
	repErrShutdown = 1<<31 + 7
	repErrTooBig   = 1<<31 + 9
)

// Info types for NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

// Structured reply chunk flags and types.
const (
	replyFlagDone         = 1 << 0
	chunkNone             = 0
	chunkOffsetData       = 1
	chunkBlockStatus      = 5
	chunkError            = 1<<15 + 1
	structReplyHeaderSize = 20
)

// base:allocation.
const (
	metaBaseAllocation = "base:allocation"
	metaBaseAllocID    = 1
	stateHole          = 1 << 0
	stateZero          = 1 << 1
)

// NBD error values. They are the Linux errno numbers, but the protocol
// defines them, so they are spelled out rather than taken from syscall.
const (
	nbdEPERM     = 1
	nbdEIO       = 5
	nbdENOMEM    = 12
	nbdEINVAL    = 22
	nbdENOSPC    = 28
	nbdEOVERFLOW = 75
	nbdENOTSUP   = 95
	nbdESHUTDOWN = 108
)

// MaxPayload is the largest READ or WRITE the server accepts, and the
// largest buffer it allocates for one request.
const MaxPayload = 32 << 20

// errnoTable is the one errno to NBD error table. Errnos not in it become
// EIO.
var errnoTable = map[syscall.Errno]uint32{
	syscall.EPERM:     nbdEPERM,
	syscall.EROFS:     nbdEPERM,
	syscall.EIO:       nbdEIO,
	syscall.ENOMEM:    nbdENOMEM,
	syscall.EINVAL:    nbdEINVAL,
	syscall.ENOSPC:    nbdENOSPC,
	syscall.EDQUOT:    nbdENOSPC,
	syscall.EFBIG:     nbdENOSPC,
	syscall.EOVERFLOW: nbdEOVERFLOW,
	syscall.ENOTSUP:   nbdENOTSUP,
	syscall.ESHUTDOWN: nbdESHUTDOWN,
}

// nbdErrno maps a backend error to the NBD error value sent to the client.
// It looks for a wrapped syscall.Errno; anything else is EIO.
func nbdErrno(err error) uint32 {
	if err == nil {
		return 0
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if v, ok := errnoTable[errno]; ok {
			return v
		}
	}
	return nbdEIO
}
