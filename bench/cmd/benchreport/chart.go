package main

import (
	"fmt"
	"image/color"
	"io"
	"math"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// Bar colours: cryptnbd stands out, plain peers are grey, encrypted peers
// orange.
var (
	colorSelf      = color.RGBA{R: 0x1f, G: 0x5f, B: 0xbf, A: 0xff}
	colorPlain     = color.RGBA{R: 0xa8, G: 0xa8, B: 0xa8, A: 0xff}
	colorEncrypted = color.RGBA{R: 0xe0, G: 0x8a, B: 0x2c, A: 0xff}
)

func barColor(server string) color.Color {
	switch {
	case server == "cryptnbd":
		return colorSelf
	case isPlain(server):
		return colorPlain
	default:
		return colorEncrypted
	}
}

// panel is one small bar chart: a value per server.
type panel struct {
	title    string
	values   []float64
	low, upp []float64 // spread over rounds (error bars), may be nil
	format   func(float64) string
}

// panels builds one panel per workload (MiB/s, or kIOPS for random ones)
// and one of server CPU per GiB on rand-read.
func (s *Summary) panels() []panel {
	var ps []panel
	for _, wl := range s.Workloads {
		p := panel{title: wl + " (MiB/s)", format: func(v float64) string { return fmt.Sprintf("%.0f", v) }}
		if isRandom(wl) {
			p.title = wl + " (k IOPS)"
			p.format = func(v float64) string { return fmt.Sprintf("%.1f", v) }
		}
		for _, srv := range s.Servers {
			c := s.Cell(srv, wl)
			v, lo, hi := 0.0, 0.0, 0.0
			if c != nil {
				v, lo, hi = c.MiBps, c.MinMiBps, c.MaxMiBps
				if isRandom(wl) {
					// IOPS scale with MiB/s at a fixed block size.
					k := c.IOPS / 1000 / c.MiBps
					v, lo, hi = c.IOPS/1000, lo*k, hi*k
				}
			}
			p.values = append(p.values, v)
			p.low = append(p.low, v-lo)
			p.upp = append(p.upp, hi-v)
		}
		ps = append(ps, p)
	}
	if len(s.Cells) > 0 {
		wl := "rand-read"
		p := panel{title: "server CPU s/GiB, " + wl, format: func(v float64) string { return fmt.Sprintf("%.1f", v) }}
		for _, srv := range s.Servers {
			v := 0.0
			if c := s.Cell(srv, wl); c != nil {
				v = c.CPUPerGiB
			}
			p.values = append(p.values, v)
		}
		ps = append(ps, p)
	}
	return ps
}

// errBars adapts a panel's spread to plotter.YErrorBars.
type errBars struct {
	plotter.XYs
	plotter.YErrors
}

func (s *Summary) buildPlot(p panel) (*plot.Plot, error) {
	pl := plot.New()
	pl.Title.Text = p.title
	pl.Title.TextStyle.Font.Size = vg.Points(10)
	pl.Y.Min = 0
	pl.Y.Tick.Label.Font.Size = vg.Points(7)
	pl.X.Tick.Label.Font.Size = vg.Points(7)
	pl.X.Tick.Label.Rotation = math.Pi / 6
	pl.X.Tick.Label.XAlign = draw.XRight
	pl.X.Tick.Label.YAlign = draw.YTop
	names := make([]string, len(s.Servers))
	top := 0.0
	var eb errBars
	for i, srv := range s.Servers {
		names[i] = short(srv)
		bar, err := plotter.NewBarChart(plotter.Values{p.values[i]}, vg.Points(14))
		if err != nil {
			return nil, err
		}
		bar.XMin = float64(i)
		bar.Color = barColor(srv)
		bar.LineStyle.Width = 0
		pl.Add(bar)
		top = max(top, p.values[i])
		if p.low != nil && p.upp[i]+p.low[i] > 0 {
			eb.XYs = append(eb.XYs, plotter.XY{X: float64(i), Y: p.values[i]})
			eb.YErrors = append(eb.YErrors, struct{ Low, High float64 }{p.low[i], p.upp[i]})
			top = max(top, p.values[i]+p.upp[i])
		}
	}
	if len(eb.XYs) > 0 {
		e, err := plotter.NewYErrorBars(eb)
		if err != nil {
			return nil, err
		}
		e.LineStyle.Width = vg.Points(0.6)
		e.CapWidth = vg.Points(4)
		pl.Add(e)
	}
	var xys plotter.XYs
	var texts []string
	for i, v := range p.values {
		if v > 0 {
			xys = append(xys, plotter.XY{X: float64(i), Y: v})
			texts = append(texts, p.format(v))
		}
	}
	if len(xys) > 0 {
		lb, err := plotter.NewLabels(plotter.XYLabels{XYs: xys, Labels: texts})
		if err != nil {
			return nil, err
		}
		for i := range lb.TextStyle {
			lb.TextStyle[i].Font.Size = vg.Points(6.5)
			lb.TextStyle[i].XAlign = draw.XCenter
			lb.TextStyle[i].YAlign = draw.YBottom
		}
		pl.Add(lb)
	}
	pl.NominalX(names...)
	pl.X.Min, pl.X.Max = -0.6, float64(len(names))-0.4
	pl.Y.Tick.Marker = plainTicks{}
	pl.Y.Max = top * 1.15
	if pl.Y.Max == 0 {
		pl.Y.Max = 1
	}
	return pl, nil
}

// writeChart draws the panels in a grid of four columns, as PNG or SVG.
func writeChart(w io.Writer, s *Summary, format string) error {
	ps := s.panels()
	if len(ps) == 0 {
		return fmt.Errorf("benchreport: nothing to chart")
	}
	const cols = 4
	rows := (len(ps) + cols - 1) / cols
	plots := make([][]*plot.Plot, rows)
	for r := range plots {
		plots[r] = make([]*plot.Plot, cols)
	}
	for i, p := range ps {
		pl, err := s.buildPlot(p)
		if err != nil {
			return fmt.Errorf("benchreport: chart: %w", err)
		}
		plots[i/cols][i%cols] = pl
	}
	width, height := vg.Points(cols*200), vg.Points(float64(rows)*165)
	var (
		c  draw.Canvas
		wt io.WriterTo
	)
	switch format {
	case "png":
		img := vgimg.NewWith(vgimg.UseWH(width, height), vgimg.UseDPI(96))
		c, wt = draw.New(img), vgimg.PngCanvas{Canvas: img}
	case "svg":
		img := vgsvg.New(width, height)
		c, wt = draw.New(img), img
	default:
		return fmt.Errorf("benchreport: unknown chart format %q", format)
	}
	t := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Points(8), PadY: vg.Points(8),
		PadTop: vg.Points(4), PadBottom: vg.Points(4), PadLeft: vg.Points(4), PadRight: vg.Points(4)}
	canvases := plot.Align(plots, t, c)
	for r := range plots {
		for col, pl := range plots[r] {
			if pl != nil {
				pl.Draw(canvases[r][col])
			}
		}
	}
	if _, err := wt.WriteTo(w); err != nil {
		return fmt.Errorf("benchreport: chart: %w", err)
	}
	return nil
}

// plainTicks are plot.DefaultTicks labelled without trailing zeros.
type plainTicks struct{}

func (plainTicks) Ticks(lo, hi float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(lo, hi)
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = strconv.FormatFloat(ts[i].Value, 'g', -1, 64)
		}
	}
	return ts
}
