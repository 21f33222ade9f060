//go:build !unix

package tunnel

const canReadRaw = false

func (b *readBatcher) readRaw() (int, error) { panic("tunnel: no raw reads here") }
