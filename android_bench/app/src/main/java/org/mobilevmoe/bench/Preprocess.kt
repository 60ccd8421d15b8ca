package org.mobilevmoe.bench

import android.graphics.Bitmap
import android.graphics.BitmapFactory
import java.io.File
import kotlin.math.abs
import kotlin.math.floor
import kotlin.math.max
import kotlin.math.min
import org.json.JSONArray
import org.json.JSONObject

/**
 * The export sidecar's `preprocess` (mobile_vmoe/preprocess.py), the one preprocessing from training to the phone:
 * resize the shorter side to [resize] ([interpolation]), centre crop [size] x [size], scale to [0, 1], then
 * (x - mean) / std per RGB channel. The iOS harness (Preprocess.swift) implements the same steps.
 */
data class Preprocess(
    val size: Int,
    val resize: Int,
    val interpolation: String,
    val mean: List<Double>,
    val std: List<Double>
) {
    companion object {
        val INTERPOLATIONS = listOf("bilinear", "bicubic", "nearest")
        private val IMAGE_EXTENSIONS = setOf("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")

        /** `preprocess` of an export sidecar (FILE.pte.json, written by `mobile-vmoe export`). */
        fun fromSidecar(file: File): Preprocess {
            val pre = try {
                val obj = JSONObject(file.readText()).getJSONObject("preprocess")
                fun doubles(key: String): List<Double> {
                    val a = obj.getJSONArray(key)
                    return List(a.length()) { a.getDouble(it) }
                }
                Preprocess(
                    size = obj.getInt("size"),
                    resize = obj.getInt("resize"),
                    interpolation = obj.optString("interpolation", "bicubic"),
                    mean = doubles("mean"),
                    std = doubles("std")
                )
            } catch (e: Exception) {
                throw IllegalArgumentException(
                    "${file.path}: no readable 'preprocess' {size, resize, interpolation, mean, std} " +
                        "(${e.message}); re-export"
                )
            }
            pre.validate(file.path)
            return pre
        }

        /** The image files of [dir] in iteration order: index.txt (what the driver stages), else sorted names. */
        fun imageFiles(dir: File): List<File> {
            val index = File(dir, "index.txt")
            if (index.isFile) {
                val names = index.readLines().map { it.trim() }.filter { it.isNotEmpty() }
                if (names.isNotEmpty()) return names.map { File(dir, it) }
            }
            val files = (dir.listFiles() ?: emptyArray())
                .filter { it.isFile && it.extension.lowercase() in IMAGE_EXTENSIONS }
                .sortedBy { it.name }
            require(files.isNotEmpty()) { "no image files under ${dir.path}" }
            return files
        }
    }

    /** The same checks as mobile_vmoe.preprocess.Preprocess; [source] names the file in the error. */
    fun validate(source: String) {
        val problems = mutableListOf<String>()
        if (size < 1) problems.add("size must be >= 1, got $size")
        if (resize < size) problems.add("resize must be >= size ($size), got $resize")
        if (interpolation !in INTERPOLATIONS) problems.add("interpolation must be one of $INTERPOLATIONS, got $interpolation")
        if (mean.size != 3) problems.add("mean must be 3 numbers, got $mean")
        if (std.size != 3 || std.any { it <= 0.0 }) problems.add("std must be 3 numbers > 0, got $std")
        require(problems.isEmpty()) { "$source: field 'preprocess': ${problems.joinToString("; ")}" }
    }

    /** Decode, resize the shorter side, centre crop: RGB in [0, 255], [size] x [size]. */
    fun crop(file: File): RgbImage {
        val image = RgbImage.decode(file)
        val w = image.width
        val h = image.height
        // torchvision Resize(int): the shorter side becomes `resize`, the longer one int(resize * long / short)
        val rw = if (w <= h) resize else (resize.toDouble() * w / h).toInt()
        val rh = if (w <= h) (resize.toDouble() * h / w).toInt() else resize
        val resized = image.resized(rw, rh, interpolation)
        // torchvision CenterCrop: offsets int(round((in - size) / 2)), Python's round (half to even) = rint
        val top = Math.rint((rh - size) / 2.0).toInt()
        val left = Math.rint((rw - size) / 2.0).toInt()
        return resized.cropped(left, top, size, size)
    }

    /** The model's float input, [3, size, size] in channel-major order: (pixel / 255 - mean) / std. */
    fun normalised(image: RgbImage): FloatArray {
        val n = image.width * image.height
        val out = FloatArray(3 * n)
        for (c in 0 until 3) {
            val m = mean[c].toFloat()
            val s = std[c].toFloat()
            for (i in 0 until n) out[c * n + i] = (image.planes[c * n + i] / 255f - m) / s
        }
        return out
    }

    fun toJson(): JSONObject = JSONObject()
        .put("size", size)
        .put("resize", resize)
        .put("interpolation", interpolation)
        .put("mean", JSONArray(mean))
        .put("std", JSONArray(std))
}

/** An RGB image as three planes of floats in [0, 255] (row-major, channel-major). */
class RgbImage(val width: Int, val height: Int, val planes: FloatArray) {
    companion object {
        /**
         * 8-bit RGB as PIL's convert("RGB") gives it: grey is replicated, 16-bit is scaled to 8 bits, alpha is
         * dropped (getPixels returns unpremultiplied colour). Like PIL, the EXIF orientation is not applied.
         */
        fun decode(file: File): RgbImage {
            val options = BitmapFactory.Options().apply {
                inPreferredConfig = Bitmap.Config.ARGB_8888
                inScaled = false
            }
            val bitmap = BitmapFactory.decodeFile(file.path, options)
                ?: throw IllegalArgumentException("${file.path}: not a readable image")
            val w = bitmap.width
            val h = bitmap.height
            val pixels = IntArray(w * h)
            bitmap.getPixels(pixels, 0, w, 0, 0, w, h)
            bitmap.recycle()
            val n = w * h
            val planes = FloatArray(3 * n)
            for (i in 0 until n) {
                val p = pixels[i]
                planes[i] = ((p shr 16) and 0xff).toFloat()
                planes[n + i] = ((p shr 8) and 0xff).toFloat()
                planes[2 * n + i] = (p and 0xff).toFloat()
            }
            return RgbImage(w, h, planes)
        }
    }

    /**
     * PIL's antialiased resampling (Image.resize, which torchvision's Resize calls): each output pixel is the
     * filter-weighted mean of the input under it, the filter stretched by the scale when shrinking. Horizontal
     * pass, then vertical, each rounded and clamped to 8 bits as PIL does (bicubic overshoots); PIL's fixed-point
     * weights can still differ by one level.
     */
    fun resized(outW: Int, outH: Int, filter: String): RgbImage {
        var image = this
        if (outW != width) {
            val taps = resampleTaps(width, outW, filter)
            val out = FloatArray(3 * outW * height)
            for (c in 0 until 3) for (y in 0 until height) {
                val src = c * width * height + y * width
                val dst = c * outW * height + y * outW
                for (x in 0 until outW) {
                    val (start, weights) = taps[x]
                    var sum = 0f
                    for (k in weights.indices) sum += weights[k] * image.planes[src + start + k]
                    out[dst + x] = to8bit(sum)
                }
            }
            image = RgbImage(outW, height, out)
        }
        if (outH != height) {
            val taps = resampleTaps(height, outH, filter)
            val out = FloatArray(3 * outW * outH)
            for (c in 0 until 3) for (y in 0 until outH) {
                val (start, weights) = taps[y]
                for (x in 0 until outW) {
                    var sum = 0f
                    for (k in weights.indices) sum += weights[k] * image.planes[c * outW * height + (start + k) * outW + x]
                    out[c * outW * outH + y * outW + x] = to8bit(sum)
                }
            }
            image = RgbImage(outW, outH, out)
        }
        return image
    }

    fun cropped(left: Int, top: Int, w: Int, h: Int): RgbImage {
        val out = FloatArray(3 * w * h)
        for (c in 0 until 3) for (y in 0 until h) for (x in 0 until w) {
            out[c * w * h + y * w + x] = planes[c * width * height + (top + y) * width + left + x]
        }
        return RgbImage(w, h, out)
    }
}

/** PIL rounds half up and clamps to 8 bits after each pass. */
fun to8bit(v: Float): Float = min(255f, max(0f, floor(v + 0.5f)))

/** For each output index: the first input index and the normalised weights of the inputs from there. */
fun resampleTaps(inSize: Int, outSize: Int, filter: String): List<Pair<Int, FloatArray>> {
    val scale = inSize.toDouble() / outSize
    if (filter == "nearest") {
        // PIL (ImagingScaleAffine): the input pixel under the output pixel's centre, the position accumulated
        // step by step as PIL does (its rounding decides exact ties such as 13.5 * 40 / 36)
        var position = scale * 0.5
        return List(outSize) {
            val tap = Pair(min(position.toInt(), inSize - 1), floatArrayOf(1f))
            position += scale
            tap
        }
    }
    val base = if (filter == "bilinear") 1.0 else 2.0
    val filterScale = max(scale, 1.0)
    val support = base * filterScale
    return List(outSize) { i ->
        val center = (i + 0.5) * scale
        val lo = max((center - support + 0.5).toInt(), 0)
        val hi = min((center + support + 0.5).toInt(), inSize)
        val weights = DoubleArray(hi - lo) { kernel(filter, (lo + it - center + 0.5) / filterScale) }
        val total = weights.sum()
        Pair(lo, FloatArray(weights.size) { (if (total != 0.0) weights[it] / total else weights[it]).toFloat() })
    }
}

/** PIL's filters: triangle (bilinear) and Keys cubic with a = -0.5 (bicubic). */
fun kernel(filter: String, x: Double): Double {
    val t = abs(x)
    if (filter == "bilinear") return if (t < 1) 1 - t else 0.0
    val a = -0.5
    if (t < 1) return ((a + 2) * t - (a + 3)) * t * t + 1
    if (t < 2) return (((t - 5) * t + 8) * t - 4) * a
    return 0.0
}
