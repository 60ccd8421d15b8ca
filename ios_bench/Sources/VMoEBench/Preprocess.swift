import CoreGraphics
import Foundation
import ImageIO

/// The export sidecar's `preprocess` (mobile_vmoe/preprocess.py), the one preprocessing from training to the phone:
/// resize the shorter side to `resize` (`interpolation`), centre crop `size` x `size`, scale to [0, 1], then
/// (x - mean) / std per RGB channel. The Android harness (Preprocess.kt) implements the same steps.
public struct Preprocess: Codable, Equatable {
    public var size: Int
    public var resize: Int
    public var interpolation: String
    public var mean: [Double]
    public var std: [Double]

    public static let interpolations = ["bilinear", "bicubic", "nearest"]

    public init(size: Int, resize: Int, interpolation: String, mean: [Double], std: [Double]) {
        self.size = size
        self.resize = resize
        self.interpolation = interpolation
        self.mean = mean
        self.std = std
    }

    /// The same checks as mobile_vmoe.preprocess.Preprocess; `source` names the file in the error.
    public func validate(_ source: String) throws {
        var problems: [String] = []
        if size < 1 { problems.append("size must be >= 1, got \(size)") }
        if resize < size { problems.append("resize must be >= size (\(size)), got \(resize)") }
        if !Preprocess.interpolations.contains(interpolation) {
            problems.append("interpolation must be one of \(Preprocess.interpolations), got \(interpolation)")
        }
        if mean.count != 3 { problems.append("mean must be 3 numbers, got \(mean)") }
        if std.count != 3 || std.contains(where: { $0 <= 0 }) { problems.append("std must be 3 numbers > 0, got \(std)") }
        if !problems.isEmpty {
            throw BenchError.badSidecar("\(source): field 'preprocess': " + problems.joined(separator: "; "))
        }
    }

    /// `preprocess` of an export sidecar (FILE.mlpackage.json, written by `mobile-vmoe export`).
    public static func fromSidecar(_ url: URL) throws -> Preprocess {
        struct Sidecar: Decodable { let preprocess: Preprocess }
        let pre: Preprocess
        do {
            pre = try JSONDecoder().decode(Sidecar.self, from: try Data(contentsOf: url)).preprocess
        } catch {
            throw BenchError.badSidecar(
                "\(url.path): no readable 'preprocess' {size, resize, interpolation, mean, std} (\(error)); re-export")
        }
        try pre.validate(url.path)
        return pre
    }

    /// The image files of `dir` in iteration order: the names listed in index.txt (what the driver stages), else
    /// the image files of the directory in sorted order.
    public static func imageFiles(in dir: URL) throws -> [URL] {
        let index = dir.appendingPathComponent("index.txt")
        if let text = try? String(contentsOf: index, encoding: .utf8) {
            let names = text.split(whereSeparator: \.isNewline).map(String.init).filter { !$0.isEmpty }
            if !names.isEmpty { return names.map { dir.appendingPathComponent($0) } }
        }
        let extensions: Set<String> = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"]
        let files = try FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)
            .filter { extensions.contains($0.pathExtension.lowercased()) }
            .sorted { $0.lastPathComponent < $1.lastPathComponent }
        if files.isEmpty { throw BenchError.badImage("no image files under \(dir.path)") }
        return files
    }

    /// Decode, resize the shorter side, centre crop: RGB in [0, 255], `size` x `size`.
    public func crop(_ url: URL) throws -> RGBImage {
        let image = try RGBImage.decode(url)
        let (w, h) = (image.width, image.height)
        // torchvision Resize(int): the shorter side becomes `resize`, the longer one int(resize * long / short)
        let (rw, rh) = w <= h
            ? (resize, Int(Double(resize) * Double(h) / Double(w)))
            : (Int(Double(resize) * Double(w) / Double(h)), resize)
        let resized = image.resized(width: rw, height: rh, filter: interpolation)
        // torchvision CenterCrop: offsets int(round((in - size) / 2)), Python's round (half to even)
        let top = Int((Double(rh - size) / 2.0).rounded(.toNearestOrEven))
        let left = Int((Double(rw - size) / 2.0).rounded(.toNearestOrEven))
        return resized.cropped(left: left, top: top, width: size, height: size)
    }

    /// The model's float input, [3, size, size] in channel-major order: (pixel / 255 - mean) / std.
    public func normalised(_ image: RGBImage) -> [Float] {
        let n = image.width * image.height
        var out = [Float](repeating: 0, count: 3 * n)
        for c in 0..<3 {
            let m = Float(mean[c]), s = Float(std[c])
            for i in 0..<n { out[c * n + i] = (image.planes[c * n + i] / 255 - m) / s }
        }
        return out
    }
}

/// An RGB image as three planes of Floats in [0, 255] (row-major, channel-major).
public struct RGBImage {
    public var width: Int
    public var height: Int
    public var planes: [Float]

    /// 8-bit RGB as PIL's convert("RGB") gives it: grey is replicated, 16-bit is scaled to 8 bits. Alpha is
    /// dropped (drawn over black). Like PIL, the EXIF orientation is not applied.
    public static func decode(_ url: URL) throws -> RGBImage {
        guard let source = CGImageSourceCreateWithURL(url as CFURL, nil),
            let image = CGImageSourceCreateImageAtIndex(source, 0, nil)
        else { throw BenchError.badImage("\(url.path): not a readable image") }
        let (w, h) = (image.width, image.height)
        var rgba = [UInt8](repeating: 0, count: w * h * 4)
        let drawn = rgba.withUnsafeMutableBytes { buffer -> Bool in
            guard let space = CGColorSpace(name: CGColorSpace.sRGB),
                let context = CGContext(
                    data: buffer.baseAddress, width: w, height: h, bitsPerComponent: 8, bytesPerRow: w * 4,
                    space: space, bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)
            else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: w, height: h))
            return true
        }
        guard drawn else { throw BenchError.badImage("\(url.path): could not be drawn as 8-bit RGB") }
        var planes = [Float](repeating: 0, count: 3 * w * h)
        for i in 0..<(w * h) {
            for c in 0..<3 { planes[c * w * h + i] = Float(rgba[4 * i + c]) }
        }
        return RGBImage(width: w, height: h, planes: planes)
    }

    /// PIL's antialiased resampling (Image.resize, which torchvision's Resize calls): each output pixel is the
    /// filter-weighted mean of the input under it, the filter stretched by the scale when shrinking. Horizontal
    /// pass, then vertical, each rounded and clamped to 8 bits as PIL does (bicubic overshoots); PIL's fixed-point
    /// weights can still differ by one level.
    public func resized(width outW: Int, height outH: Int, filter: String) -> RGBImage {
        var image = self
        if outW != width {
            let taps = resampleTaps(inSize: width, outSize: outW, filter: filter)
            var out = [Float](repeating: 0, count: 3 * outW * height)
            for c in 0..<3 {
                for y in 0..<height {
                    let src = c * width * height + y * width, dst = c * outW * height + y * outW
                    for x in 0..<outW {
                        var sum: Float = 0
                        for (k, wt) in taps[x].weights.enumerated() { sum += wt * image.planes[src + taps[x].start + k] }
                        out[dst + x] = to8bit(sum)
                    }
                }
            }
            image = RGBImage(width: outW, height: height, planes: out)
        }
        if outH != height {
            let taps = resampleTaps(inSize: height, outSize: outH, filter: filter)
            var out = [Float](repeating: 0, count: 3 * outW * outH)
            for c in 0..<3 {
                for y in 0..<outH {
                    for x in 0..<outW {
                        var sum: Float = 0
                        for (k, wt) in taps[y].weights.enumerated() {
                            sum += wt * image.planes[c * outW * height + (taps[y].start + k) * outW + x]
                        }
                        out[c * outW * outH + y * outW + x] = to8bit(sum)
                    }
                }
            }
            image = RGBImage(width: outW, height: outH, planes: out)
        }
        return image
    }

    public func cropped(left: Int, top: Int, width w: Int, height h: Int) -> RGBImage {
        var out = [Float](repeating: 0, count: 3 * w * h)
        for c in 0..<3 {
            for y in 0..<h {
                for x in 0..<w { out[c * w * h + y * w + x] = planes[c * width * height + (top + y) * width + left + x] }
            }
        }
        return RGBImage(width: w, height: h, planes: out)
    }

    /// 8-bit pixels, for a Core ML image input, whose own scale and bias normalise them.
    public func byte(_ c: Int, _ x: Int, _ y: Int) -> UInt8 { UInt8(to8bit(planes[c * width * height + y * width + x])) }
}

func to8bit(_ v: Float) -> Float { max(0, min(255, v.rounded())) }

/// For each output index: the first input index and the normalised weights of the inputs from there.
func resampleTaps(inSize: Int, outSize: Int, filter: String) -> [(start: Int, weights: [Float])] {
    let scale = Double(inSize) / Double(outSize)
    if filter == "nearest" {
        // PIL (ImagingScaleAffine): the input pixel under the output pixel's centre, the position accumulated
        // step by step as PIL does (its rounding decides exact ties such as 13.5 * 40 / 36)
        var taps: [(start: Int, weights: [Float])] = []
        var position = scale * 0.5
        for _ in 0..<outSize {
            taps.append((start: min(Int(position), inSize - 1), weights: [1]))
            position += scale
        }
        return taps
    }
    let base: Double = filter == "bilinear" ? 1 : 2
    let filterScale = max(scale, 1)
    let support = base * filterScale
    return (0..<outSize).map { i -> (start: Int, weights: [Float]) in
        let center = (Double(i) + 0.5) * scale
        let lo = max(Int(center - support + 0.5), 0)
        let hi = min(Int(center + support + 0.5), inSize)
        var weights = (lo..<hi).map { j -> Double in kernel(filter, (Double(j) - center + 0.5) / filterScale) }
        let total = weights.reduce(0, +)
        if total != 0 { weights = weights.map { $0 / total } }
        return (start: lo, weights: weights.map { Float($0) })
    }
}

/// PIL's filters: triangle (bilinear) and Keys cubic with a = -0.5 (bicubic).
func kernel(_ filter: String, _ x: Double) -> Double {
    let t = abs(x)
    if filter == "bilinear" { return t < 1 ? 1 - t : 0 }
    let a = -0.5
    if t < 1 { return ((a + 2) * t - (a + 3)) * t * t + 1 }
    if t < 2 { return (((t - 5) * t + 8) * t - 4) * a }
    return 0
}
